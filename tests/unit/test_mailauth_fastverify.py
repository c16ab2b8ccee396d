"""dkimverify's fast path (OpenSSL, our canonicalisation) only ever says "pass" where dkimpy
says pass too: it passes our RSA and Ed25519 signatures and the ones dkimpy makes, and hands
everything unusual or failing to dkimpy (the verdict and its reason are then dkimpy's)."""

from __future__ import annotations

import dkim
import pytest
from hypothesis import given, settings, strategies as st

from mailappliance.mailauth import dkimverify, sign
from mailappliance.mailauth.lookup import DNSResult
from tests.dkim_support import NOW, keypair  # noqa: F401 - keypair is a fixture

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
           b"Subject: hello   there\r\n\tfolded\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <1@example.com>\r\n\r\nbody \t line  \r\n\r\nmore\r\n\r\n\r\n")


def fast(message: bytes, key, record: str | None = None, index: int = 0) -> bool:
    try:
        headers, body = dkim.rfc822_parse(message)
    except Exception:                  # dkimpy's parser: MessageFormatError, IndexError
        return False                   # verify() says neutral without trying
    sig_headers = [h for h in headers if h[0].lower() == b"dkim-signature"]
    if len(sig_headers) <= index:
        return False
    return dkimverify._fast_pass(headers, body, sig_headers[index],
                                 (record or key.txt_record()).encode(), {})


def dkimpy(message: bytes, key, record: str | None = None, index: int = 0) -> bool:
    text = (record or key.txt_record()).encode()
    try:
        return dkim.DKIM(message).verify(idx=index, dnsfunc=lambda name, timeout=5: text)
    except Exception:
        return False


@pytest.mark.parametrize("which", [0, 1])
def test_our_signatures_pass_on_the_fast_path(keypair, which):
    key = keypair[which]
    signed = sign.sign_message(MESSAGE, [key], NOW) + MESSAGE
    assert fast(signed, key) and dkimpy(signed, key)
    result = dkimverify.verify(signed, dkimverify.signatures(signed),
                               {key.name: DNSResult("ok", (key.txt_record(),))})
    assert [r.result for r in result] == ["pass"]


def test_dkimpys_own_simple_and_relaxed_signatures_pass_too(keypair):
    pem = keypair[0].path.read_bytes()
    for canon in ((b"simple", b"simple"), (b"relaxed", b"simple"), (b"simple", b"relaxed")):
        field = dkim.sign(MESSAGE, b"mail", b"example.com", pem, canonicalize=canon,
                          include_headers=[b"from", b"subject", b"to"])
        signed = field + MESSAGE
        assert fast(signed, keypair[0]) and dkimpy(signed, keypair[0]), canon


def test_what_the_fast_path_leaves_to_dkimpy(keypair):
    rsa, ed = keypair
    signed = sign.sign_message(MESSAGE, [rsa], NOW) + MESSAGE
    record = rsa.txt_record()
    # altered body, altered signed field, a second From: above the signed one
    assert not fast(signed.replace(b"more", b"MORE"), rsa)
    assert not fast(signed.replace(b"hello", b"HELLO"), rsa)
    assert not fast(b"From: mallory@example.com\r\n" + signed, rsa)
    # key records with tags the fast path does not interpret (t=s, h=, s=), a revoked key,
    # the wrong key type
    for other in (record.replace("v=DKIM1;", "v=DKIM1; t=s;"),
                  record.replace("v=DKIM1;", "v=DKIM1; h=sha1;"),
                  record.replace("v=DKIM1;", "v=DKIM1; s=tlsrpt;"),
                  "v=DKIM1; k=rsa; p=", ed.txt_record()):
        assert not fast(signed, rsa, other), other
    # l= (a body length limit) and an expired x=
    pem = rsa.path.read_bytes()
    limited = dkim.sign(MESSAGE, b"mail", b"example.com", pem, length=True) + MESSAGE
    assert not fast(limited, rsa) and dkimpy(limited, rsa)
    # the verdict then comes from dkimpy, as before
    sigs = dkimverify.signatures(limited)
    assert dkimverify.verify(limited, sigs, {rsa.name: DNSResult("ok", (record,))})[0].result \
        == "pass"
    altered = signed.replace(b"more", b"MORE")
    (r,) = dkimverify.verify(altered, dkimverify.signatures(altered),
                             {rsa.name: DNSResult("ok", (record,))})
    assert (r.result, r.reason) == ("fail", "body hash did not verify")


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(b" \tXa\r\n:;=."), st.booleans())
def test_a_fast_pass_is_always_a_dkimpy_pass(keypair_cache, position, byte, ed):
    """Any one-byte change anywhere in a signed message (its signature field included): the
    fast path never passes what dkimpy does not."""
    key = keypair_cache[1 if ed else 0]
    signed = keypair_cache[2 if ed else 3]
    at = position % len(signed)
    changed = signed[:at] + bytes([byte]) + signed[at + 1:]
    if fast(changed, key):
        assert dkimpy(changed, key)


@pytest.fixture(scope="module")
def keypair_cache(keypair):
    return (keypair[0], keypair[1], sign.sign_message(MESSAGE, [keypair[1]], NOW) + MESSAGE,
            sign.sign_message(MESSAGE, [keypair[0]], NOW) + MESSAGE)


_BTAG_PIECES = [b";", b" ", b"\t", b"\r", b"\n", b"\r\n", b"b", b"h", b"=", b"a", b"Z", b"0",
                b"+", b"/", b"x", b"\x0b", b"\x0c", b"-", b"B", b"bh=", b" b=", b";b ="]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_BTAG_PIECES), max_size=30))
def test_the_b_value_is_taken_out_exactly_as_dkimpy_does(pieces):
    """The fast path's b= stripping (_B_VALUE) makes dkimpy's RE_BTAG substitutions."""
    value = b"".join(pieces)
    assert dkimverify._B_VALUE.sub(b"\\1", value) == dkim.RE_BTAG.sub(b"\\1", value)
