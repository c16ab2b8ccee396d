"""RFC 5321 path parsing and the relay-trick classifier (mailappliance.address)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mailappliance import address as A
from mailappliance.address import AddressError, Mailbox, classify, parse_address, split_path


def fwd(text: str):
    return split_path(text, null_ok=False, postmaster_domain="mx.test.com")


@pytest.mark.parametrize("text, local, domain, rest", [
    ("<user@test.com>", "user", "test.com", ""),
    ("<User@TEST.Com>", "User", "test.com", ""),                 # domain folded, local kept
    ("<first.last+tag@test.com>", "first.last+tag", "test.com", ""),
    ("  <user@test.com>", "user", "test.com", ""),                # space after the colon
    ("user@test.com", "user", "test.com", ""),                    # unbracketed (qmail/Postfix)
    ("user@test.com SIZE=10", "user", "test.com", "SIZE=10"),
    ("<user@test.com> SIZE=10 BODY=8BITMIME", "user", "test.com", "SIZE=10 BODY=8BITMIME"),
    ('<"john smith"@test.com>', "john smith", "test.com", ""),
    ('<"a\\"b"@test.com>', 'a"b', "test.com", ""),                # quoted-pair
    ('<"a>b"@test.com> X=1', "a>b", "test.com", "X=1"),           # '>' inside quotes
    ('<"user"@test.com>', "user", "test.com", ""),                # needless quotes: same mailbox
    ("<user@[192.0.2.1]>", "user", "[192.0.2.1]", ""),
    ("<user@[IPv6:2001:DB8:0:0::1]>", "user", "[IPv6:2001:db8::1]", ""),
    ("<user@test.com.>", "user", "test.com", ""),                 # root label removed
    ("<@a.example,@b.example:user@test.com>", "user", "test.com", ""),   # route ignored
    ("<Postmaster>", "postmaster", "mx.test.com", ""),            # RFC 5321 4.1.1.3
    ("<postmaster>", "postmaster", "mx.test.com", ""),
])
def test_forward_paths_parse_to_the_final_mailbox(text, local, domain, rest):
    path, params = fwd(text)
    assert (path.mailbox.local, path.mailbox.domain, params) == (local, domain, rest)


@pytest.mark.parametrize("text", [
    "", "<>", "<", "<user@test.com", "user", "<user>", "<user@>", "<@test.com>",
    "<user@@test.com>", "<us er@test.com>", "<user@te_st.com>", "<user@-test.com>",
    "<user@test-.com>", "<user@test..com>", "<user@.test.com>", "<user@test.com..>",
    "<.user@test.com>", "<user.@test.com>", "<us..er@test.com>", '<"unterminated@test.com>',
    '<"a"b@test.com>', "<user@[300.1.1.1]>", "<user@[1.2.3]>", "<user@[IPv6:zz::1]>",
    "<user@[tag:content]>", "<user@[192.0.2.1>", "<user@test.com>junk",
    "<@a.example:user>", "<@bad_domain:user@test.com>", "<a.example:user@test.com>",
    "<@a.example user@test.com>", "<us\x01er@test.com>", '<"a\x7fb"@test.com>',
    "<usér@test.com>", "<user@tést.com>",
])
def test_malformed_paths_are_syntax_errors(text):
    with pytest.raises(AddressError) as info:
        fwd(text)
    assert info.value.reason == AddressError.SYNTAX


def test_null_reverse_path_only_where_allowed():
    path, rest = split_path("<> SIZE=5", null_ok=True)
    assert path.mailbox is None and rest == "SIZE=5"
    with pytest.raises(AddressError):
        split_path("<>", null_ok=False)


def test_postmaster_without_domain_only_for_forward_paths():
    with pytest.raises(AddressError):
        split_path("<postmaster>", null_ok=True)        # no postmaster_domain given


@pytest.mark.parametrize("text, ok", [
    # RFC 5321 4.5.3.1.1: local part 64 octets
    ("<" + "a" * 64 + "@test.com>", True),
    ("<" + "a" * 65 + "@test.com>", False),
    ('<"' + "a" * 64 + '"@test.com>', True),
    ('<"' + "a" * 65 + '"@test.com>', False),
    # RFC 1035 labels: 63 octets
    ("<a@" + "b" * 63 + ".com>", True),
    ("<a@" + "b" * 64 + ".com>", False),
    # RFC 5321 4.5.3.1.3: path 256 octets including the brackets (local 60 + @ + domain 193)
    ("<" + "a" * 60 + "@" + ".".join(["b" * 63] * 3) + ".c>", True),       # 256
    ("<" + "a" * 60 + "@" + ".".join(["b" * 63] * 3) + ".cc>", False),     # 257
])
def test_length_limits(text, ok):
    if ok:
        fwd(text)
    else:
        with pytest.raises(AddressError) as info:
            fwd(text)
        assert info.value.reason == AddressError.TOO_LONG


def test_domain_limit_255_checked_before_path_limit():
    domain = ".".join(["b" * 63] * 4)          # 255 octets
    with pytest.raises(AddressError) as info:
        A._parse_domain(domain + "x")
    assert info.value.reason == AddressError.TOO_LONG
    assert A._parse_domain(domain)[0] == domain


@pytest.mark.parametrize("mailbox, text", [
    (Mailbox("user", "test.com"), "user@test.com"),
    (Mailbox("john smith", "test.com"), '"john smith"@test.com'),
    (Mailbox('a"b\\c', "test.com"), '"a\\"b\\\\c"@test.com'),
    (Mailbox("a@b", "test.com"), '"a@b"@test.com'),
])
def test_canonical_form_requotes_and_round_trips(mailbox, text):
    assert str(mailbox) == text
    assert parse_address(text) == mailbox


@pytest.mark.parametrize("text, domain, literal, route_chars, tricks", [
    ("<user@test.com>", "test.com", False, False, set()),
    ("<a%remote.example@test.com>", "test.com", False, True, {A.TRICK_PERCENT}),
    ("<remote.example!a@test.com>", "test.com", False, True, {A.TRICK_BANG}),
    ('<"a@remote.example"@test.com>', "test.com", False, True,
     {A.TRICK_QUOTED_AT, A.TRICK_QUOTED}),
    ('<"a b"@test.com>', "test.com", False, True, {A.TRICK_QUOTED}),
    ("<@test.com:user@remote.example>", "remote.example", False, False, {A.TRICK_SOURCE_ROUTE}),
    ("<user@[127.0.0.1]>", "[127.0.0.1]", True, False, {A.TRICK_LITERAL}),
    ("<user@remote.example.>", "remote.example", False, False, {A.TRICK_TRAILING_DOT}),
    ("<USER@Remote.EXAMPLE>", "remote.example", False, False, set()),
    ("<a%b@remote.example>", "remote.example", False, True, {A.TRICK_PERCENT}),
])
def test_classifier_reports_final_domain_and_tricks(text, domain, literal, route_chars, tricks):
    dest = classify(fwd(text)[0])
    assert dest.domain == domain
    assert dest.literal is literal
    assert dest.route_chars is route_chars
    assert dest.tricks == frozenset(tricks)


def test_classify_refuses_the_null_path():
    with pytest.raises(ValueError):
        classify(split_path("<>", null_ok=True)[0])


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_any_text_parses_or_raises_address_error(text):
    """No input makes the parser raise anything but AddressError; whatever parses is clean:
    ASCII, no control characters, within the RFC 5321 length limits, and stable under re-parse."""
    try:
        path, rest = fwd(text)
    except AddressError:
        return
    mb = path.mailbox
    canonical = str(mb)
    assert canonical.isascii()
    assert not any(ord(c) < 32 or ord(c) == 127 for c in canonical)
    assert len(mb.local.encode()) <= A.MAX_LOCAL_PART
    assert len(mb.domain) <= A.MAX_DOMAIN + 20      # literal brackets and "IPv6:" tag
    assert parse_address(canonical) == mb


_atext = st.sampled_from(list("abcXYZ019!#$%&'*+/=?^_`{|}~-"))


@settings(max_examples=300, deadline=None)
@given(local=st.lists(st.text(_atext, min_size=1, max_size=8), min_size=1, max_size=4),
       labels=st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?", fullmatch=True),
                       min_size=1, max_size=4))
def test_generated_valid_addresses_parse(local, labels):
    text = ".".join(local) + "@" + ".".join(labels)
    mb = parse_address(text)
    assert mb.local == ".".join(local)
    assert mb.domain == ".".join(labels).lower()
    assert classify(fwd(f"<{text}>")[0]).domain == mb.domain
