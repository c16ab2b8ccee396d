"""The relay decision table (mailappliance.access.relay_policy): local users, aliases, unknown
users, remote domains, and every address trick, for each kind of relay permission."""

from __future__ import annotations

import pytest

from mailappliance.access.relay_policy import RelayClient, decide, needs_user_lookup
from mailappliance.address import classify, split_path
from mailappliance.smtp import replies

NOBODY = RelayClient()
RELAYCLIENT = RelayClient(relayclient=True)
AUTHED = RelayClient(authenticated=True)
ROAMING = RelayClient(granted=True)
ALL_CLIENTS = [NOBODY, RELAYCLIENT, AUTHED, ROAMING]


def dest(text):
    return classify(split_path(text, null_ok=False, postmaster_domain="mx.test.com")[0])


@pytest.mark.parametrize("client", ALL_CLIENTS)
@pytest.mark.parametrize("lookup, accept, reply", [
    ("user", True, replies.RCPT_OK),
    ("alias", True, replies.RCPT_OK),
    ("unknown", False, replies.NO_MAILBOX),      # no backscatter, even for relay clients
])
def test_local_domains_are_judged_by_the_store_for_every_client(client, lookup, accept, reply):
    v = decide(dest("<someone@test.com>"), lookup, client)
    assert (v.accept, v.reply) == (accept, reply)


@pytest.mark.parametrize("client, accept", [
    (NOBODY, False), (RELAYCLIENT, True), (AUTHED, True), (ROAMING, True)])
def test_remote_domains_need_a_relay_permission(client, accept):
    v = decide(dest("<someone@remote.example>"), "remote", client)
    assert v.accept is accept
    if accept:
        assert v.reply == replies.RCPT_OK
    else:
        assert v.reply.render() == (
            b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n")


# The classic open-relay probes (as in the RelayTest / abuse.net test suites), sent to a server
# whose only domain is test.com, by a client without any relay permission.
RELAY_PROBES = [
    ("<victim%remote.example@test.com>", "unknown"),
    ("<remote.example!victim@test.com>", "unknown"),
    ('<"victim@remote.example"@test.com>', "unknown"),
    ('<"victim%remote.example"@test.com>', "unknown"),
    ("<victim%remote.example@[127.0.0.1]>", "remote"),
    ("<victim@[127.0.0.1]>", "remote"),
    ("<victim@[IPv6:::1]>", "remote"),
    ("<@test.com:victim@remote.example>", "remote"),
    ("<@test.com,@mx.test.com:victim@remote.example>", "remote"),
    ("<victim@remote.example.>", "remote"),
    ("<VICTIM@REMOTE.EXAMPLE>", "remote"),
    ("<victim@remote.example@test.com>", None),      # syntax error before any policy
]


@pytest.mark.parametrize("text, lookup", RELAY_PROBES)
def test_no_address_trick_relays(text, lookup):
    if lookup is None:
        with pytest.raises(ValueError):
            dest(text)
        return
    d = dest(text)
    v = decide(d, lookup, NOBODY)
    assert not v.accept
    assert v.reply.code in (550, 553)


def test_routing_characters_never_reach_the_user_store():
    assert needs_user_lookup(dest("<plain@test.com>"))
    for text in ("<a%b@test.com>", "<b!a@test.com>", '<"a@b"@test.com>', '<"a b"@test.com>',
                 "<a@[192.0.2.1]>"):
        assert not needs_user_lookup(dest(text))


def test_routing_local_part_in_our_domain_is_550_even_for_relay_clients():
    v = decide(dest("<a%remote.example@test.com>"), "unknown", RELAYCLIENT)
    assert (v.accept, v.reply, v.why) == (False, replies.BAD_LOCAL_PART, "routing-local-part")


def test_relay_client_may_send_tricky_addresses_to_remote_domains():
    # The remote domain decides what "a%b" means there; we only carry it.
    assert decide(dest("<a%b@remote.example>"), "remote", RELAYCLIENT).accept


def test_literal_is_remote_whatever_the_store_says():
    assert not decide(dest("<postmaster@[127.0.0.1]>"), "user", NOBODY).accept


def test_unknown_lookup_answer_is_a_programming_error():
    with pytest.raises(ValueError):
        decide(dest("<a@test.com>"), "maybe", NOBODY)
