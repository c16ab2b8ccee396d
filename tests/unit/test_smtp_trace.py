"""smtp/trace.py: the Message-ID found in a streaming header, and the trace text of new msg."""

from hypothesis import given, strategies as st

from mailappliance.queue.naming import message_name, parse_message_name
from mailappliance.smtp.trace import MAX_MESSAGE_ID, MessageIdScanner, trace_text

import pytest


def scan(*chunks: bytes) -> MessageIdScanner:
    s = MessageIdScanner()
    for c in chunks:
        s.feed(c)
    return s


def test_finds_the_first_message_id_in_the_header_whatever_the_chunks():
    msg = b"Received: x\nSubject: hi\nMessage-Id:  <a.b@c.example>\nMessage-ID: <2nd@x>\n\nbody\n"
    for cut in range(len(msg)):
        s = scan(msg[:cut], msg[cut:])
        assert s.done and s.message_id == "<a.b@c.example>", cut


def test_folded_value_is_unfolded_and_the_body_is_never_read():
    s = scan(b"Message-ID:\n <folded@x>\nSubject: s\n\nMessage-ID: <body@x>\n")
    assert s.message_id == "<folded@x>"
    assert scan(b"Subject: s\n\nMessage-ID: <body@x>\n").message_id is None


def test_a_huge_value_is_cut_and_a_huge_header_is_given_up():
    s = scan(b"Message-ID: <" + b"x" * 100_000 + b">\n\n")
    assert len(s.message_id) <= MAX_MESSAGE_ID
    s = scan(b"X-Pad: " + b"y" * 300_000 + b"\nMessage-ID: <late@x>\n\n")
    assert s.done and s.message_id is None


@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=50))
def test_any_bytes_in_any_pieces_never_raise_and_keep_memory_bounded(data, step):
    s = MessageIdScanner()
    for i in range(0, len(data), step):
        s.feed(data[i:i + step])
    assert len(s._line) <= MAX_MESSAGE_ID + 16


def test_trace_text_is_one_line_of_key_value_words():
    assert trace_text("192.0.2.7", "client example", None, "<a b@c>\n") == (
        "rip=192.0.2.7 helo=client_example auth=- message-id=<a_b@c>?")
    assert trace_text("", None, "alice@example.com", None) == (
        "rip=- helo=- auth=alice@example.com message-id=-")


def test_message_names_tell_reused_inode_numbers_apart_and_parse_back():
    a, b = message_name(42, "1.2.3.aaaa"), message_name(42, "1.2.4.bbbb")
    assert a != b and a.startswith("42.") and len(a) == 11
    assert parse_message_name(a) == (42, a[3:])
    assert parse_message_name("42") == (42, None)
    for bad in ("", "x", "42.", "42.XYZ", "-1", "42.123456789", "1" * 21):
        with pytest.raises(ValueError):
            parse_message_name(bad)
