"""The relay decision table (mailappliance.access.relay_policy): local users, aliases, unknown
users, remote domains, and every address trick, for each kind of relay permission. The policy
answers with a `Verdict`; the reply each verdict gets is tested in test_smtp_replies.py."""

from __future__ import annotations

import pytest

from mailappliance.access.relay_policy import RelayClient, Verdict, decide, needs_user_lookup
from mailappliance.address import classify, split_path

NOBODY = RelayClient()
RELAYCLIENT = RelayClient(relayclient=True)
AUTHED = RelayClient(authenticated=True)
ROAMING = RelayClient(granted=True)
ALL_CLIENTS = [NOBODY, RELAYCLIENT, AUTHED, ROAMING]


def dest(text):
    return classify(split_path(text, null_ok=False, postmaster_domain="mx.test.com")[0])


@pytest.mark.parametrize("client", ALL_CLIENTS)
@pytest.mark.parametrize("lookup, accept, verdict", [
    ("user", True, Verdict.LOCAL),
    ("alias", True, Verdict.ALIAS),
    ("unknown", False, Verdict.NO_MAILBOX),      # no backscatter, even for relay clients
])
def test_local_domains_are_judged_by_the_store_for_every_client(client, lookup, accept, verdict):
    v = decide(dest("<someone@test.com>"), lookup, client)
    assert (v, v.accept) == (verdict, accept)


@pytest.mark.parametrize("client, accept", [
    (NOBODY, False), (RELAYCLIENT, True), (AUTHED, True), (ROAMING, True)])
def test_remote_domains_need_a_relay_permission(client, accept):
    v = decide(dest("<someone@remote.example>"), "remote", client)
    assert v.accept is accept
    assert v is (Verdict.RELAY if accept else Verdict.NO_RELAY)
    assert v.why == ("relay" if accept else "no-relay")


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
    if lookup == "remote":
        assert v is Verdict.NO_RELAY
    else:
        assert v is Verdict.ROUTING_LOCAL_PART


def test_routing_characters_never_reach_the_user_store():
    assert needs_user_lookup(dest("<plain@test.com>"))
    for text in ("<a%b@test.com>", "<b!a@test.com>", '<"a@b"@test.com>', '<"a b"@test.com>',
                 "<a@[192.0.2.1]>"):
        assert not needs_user_lookup(dest(text))


def test_routing_local_part_in_our_domain_is_550_even_for_relay_clients():
    v = decide(dest("<a%remote.example@test.com>"), "unknown", RELAYCLIENT)
    assert (v, v.accept, v.why) == (Verdict.ROUTING_LOCAL_PART, False, "routing-local-part")


def test_relay_client_may_send_tricky_addresses_to_remote_domains():
    # The remote domain decides what "a%b" means there; we only carry it.
    assert decide(dest("<a%b@remote.example>"), "remote", RELAYCLIENT) is Verdict.RELAY


def test_literal_is_remote_whatever_the_store_says():
    assert decide(dest("<postmaster@[127.0.0.1]>"), "user", NOBODY) is Verdict.NO_RELAY
    assert decide(dest("<postmaster@[127.0.0.1]>"), "user", AUTHED) is Verdict.RELAY


def test_unknown_lookup_answer_is_a_programming_error():
    with pytest.raises(ValueError):
        decide(dest("<a@test.com>"), "maybe", NOBODY)


def test_the_policy_imports_nothing_from_smtp():
    """The arrow runs smtp -> access: the verdict is a plain value, its reply lives in smtp."""
    import ast
    import mailappliance.access.relay_policy as mod
    tree = ast.parse(open(mod.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m and m.startswith("mailappliance.smtp")]
