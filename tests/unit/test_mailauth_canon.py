"""Our relaxed canonicalisation (mailauth/canon.py) is byte for byte dkimpy's, on any input."""

from __future__ import annotations

from dkim.canonicalization import Relaxed
from hypothesis import example, given, settings, strategies as st

from mailappliance.mailauth import canon

# Bytes where the rules act: blanks, tabs, CR, LF, and a few others.
TEXT = st.lists(st.sampled_from([b" ", b"\t", b"\r\n", b"\r", b"\n", b"a", b"b", b".",
                                 b"\x0b", b"\xff"]), max_size=60).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(TEXT)
@example(b"")
@example(b"\r\n\r\n")
@example(b"a  \t b \r\n \r\n\r\n")
@example(b"abc \t")
def test_relaxed_body_is_dkimpys(body):
    crlf = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert canon.relaxed_body(crlf) == Relaxed.canonicalize_body(crlf)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"Subject", b"FROM ", b"x-Y"]), TEXT)
@example(b"Subject", b" hello \r\n\tworld  \r\n")
@example(b"To", b"\r\r\n a")
def test_relaxed_header_is_dkimpys(name, value):
    assert canon.relaxed_headers([(name, value)]) == Relaxed.canonicalize_headers([(name, value)])


@settings(max_examples=300, deadline=None)
@given(TEXT)
@example(b"\r\r\n\n\r")
def test_to_crlf_turns_every_line_end_into_crlf_and_leaves_lone_crs(text):
    import re

    from mailappliance.mailauth.message import to_crlf
    assert to_crlf(text) == re.sub(rb"\r?\n", b"\r\n", text)
