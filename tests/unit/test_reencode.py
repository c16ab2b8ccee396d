"""reencode.py: messages with lines over RFC 5321's limit re-encoded so that no line is longer
than 998 octets and a MIME reader decodes the same content; everything else unchanged."""

from __future__ import annotations

import base64
import email
import email.policy
import re

import pytest
from hypothesis import given, settings, strategies as st

from mailappliance.reencode import (MAX_LINE, MIME_NESTING_LIMIT, LongLineScanner, fit_lines,
                                    has_long_line)


def longest(message: bytes) -> int:
    return max(map(len, message.splitlines()), default=0)


def leaves(message: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded content with line ends as LF) of each leaf, as a MIME reader
    (the stdlib's) sees the message on the wire (CRLF line ends)."""
    wire = b"\r\n".join(message.splitlines()) + b"\r\n"
    msg = email.message_from_bytes(wire, policy=email.policy.compat32)
    out = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, list):          # message/rfc822: walk() went inside already
            continue
        out.append((part.get_content_type(), re.sub(rb"\r\n|\r", b"\n", payload or b"")))
    return out


def same_content(before: bytes, after: bytes) -> None:
    a, b = leaves(before), leaves(after)
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x.rstrip(b"\n") == y.rstrip(b"\n")


LONG = b"<p>" + b"word " * 14000 + b"</p>"             # 70,007 octets, one line


def test_a_message_without_long_lines_is_returned_unchanged():
    m = b"Subject: x\n\n" + (b"y" * MAX_LINE + b"\n") * 3
    assert not has_long_line(m)
    assert fit_lines(m) is m


def test_a_plain_message_with_a_70000_octet_line_becomes_quoted_printable():
    m = b"From: a@test.com\nSubject: long\n\nshort line\n" + LONG + b"\nlast\n"
    out = fit_lines(m)
    assert longest(out) <= 76
    head, _, body = out.partition(b"\n\n")
    assert head == (b"From: a@test.com\nSubject: long\nContent-Transfer-Encoding: "
                    b"quoted-printable\nMIME-Version: 1.0")
    assert body.startswith(b"short line\n<p>word word ")
    assert out.endswith(b" wo=\nrd word word word word word </p>\nlast\n")
    same_content(m, out)
    assert fit_lines(out) is out                          # once is enough


def test_undeclared_8bit_text_gets_a_charset_with_its_escapes():
    m = "Subject: é\n\n".encode() + "é".encode() * 600 + b"\n"
    out = fit_lines(m)
    assert b"Content-Type: text/plain; charset=utf-8\n" in out
    assert leaves(out)[0][1].decode("utf-8") == "é" * 600 + "\n"
    latin = b"Subject: x\n\n" + b"\xe9" * 1200 + b"\n"
    assert b"charset=unknown-8bit" in fit_lines(latin)


def test_only_the_offending_leaf_of_a_multipart_is_re_encoded():
    m = (b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\npreamble\n"
         b"--b1\nContent-Type: text/plain\n\nfine part\n"
         b"--b1\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
         + LONG + b"\n"
         b"--b1\nContent-Type: application/octet-stream\n\n" + b"\x01" * 2000 + b"\n"
         b"--b1--\nepilogue\n")
    out = fit_lines(m)
    assert longest(out) <= MAX_LINE
    assert b"--b1\nContent-Type: text/plain\n\nfine part\n--b1\n" in out      # untouched
    assert (b"Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: "
            b"quoted-printable\n\n<p>word") in out
    assert b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\nAQEB" \
        in out
    assert out.endswith(b"\n--b1--\nepilogue\n")
    same_content(m, out)


def test_an_unwrapped_base64_attachment_is_wrapped():
    data = bytes(range(256)) * 300
    m = (b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=x\n\n"
         b"--x\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\n"
         + base64.b64encode(data) + b"\n--x--\n")
    out = fit_lines(m)
    assert longest(out) <= 76
    assert leaves(out) == [("image/png", re.sub(rb"\r\n|\r", b"\n", data))]
    same_content(m, out)


def test_quoted_printable_with_long_lines_is_encoded_again():
    m = (b"MIME-Version: 1.0\nContent-Type: text/plain\nContent-Transfer-Encoding: "
         b"quoted-printable\n\n" + b"caf=C3=A9 " * 400 + b"\n")
    out = fit_lines(m)
    assert longest(out) <= 76
    same_content(m, out)


def test_a_forwarded_message_part_is_looked_into():
    inner = b"Subject: inner\n\n" + LONG + b"\n"
    m = (b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=o\n\n"
         b"--o\nContent-Type: message/rfc822\n\n" + inner + b"--o--\n")
    out = fit_lines(m)
    assert longest(out) <= MAX_LINE
    assert b"Content-Type: message/rfc822\n\nSubject: inner\nContent-Transfer-Encoding: " \
           b"quoted-printable\nMIME-Version: 1.0\n\n" in out
    same_content(m, out)


def test_a_long_header_line_is_folded_at_white_space_and_unfolds_the_same():
    subject = b"Subject: " + b"several words " * 200
    m = subject + b"\nFrom: a@test.com\n\nbody\n"
    out = fit_lines(m)
    assert longest(out) <= MAX_LINE
    msg = email.message_from_bytes(out, policy=email.policy.compat32)
    assert re.sub(r"\r?\n", "", msg["Subject"]) == subject[9:].decode()
    assert out.endswith(b"\nFrom: a@test.com\n\nbody\n")


def test_where_nothing_else_works_lines_are_broken():
    no_space = b"X-Token: " + b"t" * 3000 + b"\n\nbody\n"
    out = fit_lines(no_space)
    assert longest(out) <= MAX_LINE
    assert out.replace(b"\n ", b"") == no_space             # broken, one space added per cut
    deep = b"Content-Type: multipart/mixed; boundary=z\n\n"
    for _ in range(MIME_NESTING_LIMIT):
        deep += b"--z\nContent-Type: multipart/mixed; boundary=z\n\n"
    deep += b"--z\n\n" + b"q" * 2000 + b"\n--z--\n"
    assert longest(fit_lines(deep)) <= MAX_LINE


def test_crlf_messages_keep_crlf():
    m = b"Subject: x\r\n\r\n" + LONG + b"\r\n"
    out = fit_lines(m)
    assert b"\n" not in out.replace(b"\r\n", b"")
    assert longest(out) <= 76
    same_content(m, out)


def test_the_scanner_finds_long_lines_across_chunks():
    m = b"a\n" + b"x" * 600 + b"\r" + b"\n" + b"y" * 998 + b"\n" + b"z" * 999
    for size in (1, 7, 600, 601, 4096):
        s = LongLineScanner()
        found = [s.feed(m[i:i + size]) for i in range(0, len(m), size)]
        assert found[-1] and not any(found[:-1]) and (len(m) - 1) // size == len(found) - 1
    s = LongLineScanner()
    assert not any(s.feed(c) for c in (b"x" * 500, b"x" * 498, b"\n", b"y" * 998))
    assert s.feed(b"y")


# --- properties ---------------------------------------------------------------------------------

line = st.one_of(st.binary(max_size=40).map(lambda b: re.sub(rb"[\r\n]", b"", b)),
                 st.integers(MAX_LINE - 2, 3 * MAX_LINE).map(lambda n: b"w" * n),
                 st.integers(999, 2500).map(lambda n: (b"\xc3\xa9 " * n)[:n]))
text = st.lists(line, max_size=6).map(lambda ls: b"\n".join(ls))
ending = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def messages(draw):
    nl = draw(ending)
    kind = draw(st.sampled_from(["plain", "multipart", "base64"]))
    if kind == "plain":
        m = b"Subject: p\n\n" + draw(text) + b"\n"
    elif kind == "base64":
        m = (b"MIME-Version: 1.0\nContent-Type: application/pdf\nContent-Transfer-Encoding: "
             b"base64\n\n" + base64.b64encode(draw(st.binary(max_size=3000))) + b"\n")
    else:
        parts = draw(st.lists(st.tuples(st.sampled_from(["text/plain", "text/html",
                                                         "application/x-data"]), text),
                              min_size=1, max_size=4))
        m = b"MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=\"=-b\"\n\n"
        for ctype, body in parts:
            m += b"--=-b\nContent-Type: " + ctype.encode() + b"\n\n" + body + b"\n"
        m += b"--=-b--\n"
    return m.replace(b"\n", nl)


@settings(max_examples=150, deadline=None)
@given(messages())
def test_fitted_messages_have_short_lines_and_decode_to_the_same_content(m):
    out = fit_lines(m)
    assert longest(out) <= MAX_LINE
    same_content(m, out)
    assert fit_lines(out) == out
    if not has_long_line(m):
        assert out == m


@settings(max_examples=100, deadline=None)
@given(messages(), st.integers(1, 5000))
def test_the_scanner_agrees_with_has_long_line(m, size):
    s = LongLineScanner()
    for i in range(0, len(m), size):
        s.feed(m[i:i + size])
    assert s.found == has_long_line(m)


def test_a_long_line_deep_in_nested_parts_is_re_encoded_and_only_that_leaf():
    """Each level of nesting is looked at without reading its whole body again (the long
    lines are found once): a part 60 levels down is re-encoded, its siblings on the way stay
    byte for byte, and the content decodes the same."""
    leaf = b"Content-Type: text/plain\n\n" + b"z" * 5000 + b"\n"
    m = leaf
    for d in range(60):
        b = b"n%d" % d
        m = (b"Content-Type: multipart/mixed; boundary=\"" + b + b"\"\n\npreamble\n--" + b +
             b"\nContent-Type: text/plain\n\nsibling %d\n--" % d + b + b"\n" + m +
             b"\n--" + b + b"--\nepilogue\n")
    m = b"From: a@example.org\nMIME-Version: 1.0\n" + m
    out = fit_lines(m)
    assert longest(out) <= MAX_LINE
    same_content(m, out)
    assert out.count(b"Content-Transfer-Encoding: quoted-printable") == 1
    assert all(b"\nsibling %d\n" % d in out for d in range(60))
    assert out.replace(b"Content-Transfer-Encoding: quoted-printable\n", b"").split(
        b"z" * 10)[0] == m.split(b"z" * 10)[0]            # everything before the leaf kept
