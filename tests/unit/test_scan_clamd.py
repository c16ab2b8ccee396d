"""clamd's INSTREAM framing and reply parsing (mailappliance/scan/clamd.py), no sockets."""

from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from mailappliance.scan import clamd
from mailappliance.scan.clamd import (
    END_OF_STREAM, INSTREAM, ReplyReader, closed_without_reply, instream_request,
    parse_instream_reply, parse_ping_reply, parse_session_reply)
from mailappliance.scan.interfaces import ScanFailure, VirusReport


def unframe(buffers) -> tuple[bytes, list[int]]:
    """Reassemble what clamd would read: the command, then length-prefixed chunks to 0."""
    wire = b"".join(bytes(b) for b in buffers)
    assert wire.startswith(INSTREAM)
    pos, data, sizes = len(INSTREAM), b"", []
    while True:
        (n,) = struct.unpack(">I", wire[pos:pos + 4])
        pos += 4
        if n == 0:
            assert pos == len(wire), "bytes after the end marker"
            return data, sizes
        data += wire[pos:pos + n]
        sizes.append(n)
        pos += n


@given(st.lists(st.binary(max_size=300), max_size=12), st.integers(1, 256))
def test_the_request_carries_the_message_exactly_in_bounded_chunks(chunks, size):
    buffers = list(instream_request(chunks, frame_bytes=size))
    data, sizes = unframe(buffers)
    assert data == b"".join(chunks)
    assert all(0 < n <= size for n in sizes)
    assert all(n == size for n in sizes[:-1])          # only the last chunk is short
    assert buffers[0] == INSTREAM and buffers[-1] == END_OF_STREAM


def test_empty_message_is_command_and_end_marker_only():
    assert list(instream_request([])) == [INSTREAM, END_OF_STREAM]
    assert list(instream_request([b"", b""])) == [INSTREAM, END_OF_STREAM]


def test_the_message_is_never_copied():
    chunk = b"x" * 1000
    buffers = list(instream_request([chunk, b"y" * 10]))
    assert buffers[2] is chunk                          # a chunk that fits goes as it is
    big = b"z" * (clamd.FRAME_BYTES + 1)
    pieces = list(instream_request([big]))[1:-1]
    slices = [p for p in pieces if isinstance(p, memoryview)]
    assert all(p.obj is big for p in slices)                    # slices of it, no copies
    assert sum(len(p) for p in slices) == len(big)


def test_memoryview_and_bytearray_chunks():
    buffers = list(instream_request([memoryview(b"abc"), bytearray(b"def")], frame_bytes=4))
    assert unframe(buffers)[0] == b"abcdef"
    wide = memoryview(bytearray(b"abcdefgh")).cast("I")        # 2 items of 4 bytes
    assert unframe(instream_request([wide], frame_bytes=3))[0] == b"abcdefgh"


def test_default_frame_is_64_kib():
    buffers = list(instream_request([b"a" * (clamd.FRAME_BYTES + 1)]))
    lengths = [struct.unpack(">I", b)[0] for b in buffers[1:-1] if len(b) == 4]
    assert lengths == [clamd.FRAME_BYTES, 1]


def test_session_replies_carry_the_command_number():
    assert parse_session_reply(b"3: stream: OK", 3) == VirusReport(None)
    assert parse_session_reply(b"1: stream: Eicar FOUND", 1) == VirusReport("Eicar")
    wrong = parse_session_reply(b"2: stream: OK", 3)           # not the answer we wait for
    assert isinstance(wrong, ScanFailure) and wrong.outage and "expected" in wrong.detail
    bare = parse_session_reply(b"stream: OK", 1)
    assert isinstance(bare, ScanFailure)


def test_reply_reader_joins_pieces_and_stops_at_nul_or_newline():
    r = ReplyReader()
    assert r.feed(b"stream: ") is None
    assert r.feed(b"OK\0trailing") == b"stream: OK"
    assert ReplyReader().feed(b"PONG\n") == b"PONG"


def test_reply_reader_gives_up_past_its_limit():
    r = ReplyReader(max_reply=10)
    assert r.feed(b"x" * 11) is None
    assert r.overflow and len(r.partial) == 10
    assert r.feed(b"\0") is None                     # nothing more is read after overflow
    failure = closed_without_reply(r, sent_all=True)
    assert isinstance(failure, ScanFailure) and failure.outage
    assert "unexpected answer" in failure.detail


REPLIES = [
    (b"stream: OK", VirusReport(None)),
    (b"stream: Eicar-Signature FOUND", VirusReport("Eicar-Signature")),
    (b"stream: Win.Test.EICAR_HDB-1 FOUND", VirusReport("Win.Test.EICAR_HDB-1")),
    (b"stream: Eicar-Test-Body.UNOFFICIAL FOUND", VirusReport("Eicar-Test-Body.UNOFFICIAL")),
    (b"1: stream: OK", VirusReport(None)),                        # IDSESSION prefix
    (b"stream: Bad\rName\x01<x> FOUND", VirusReport("Bad?Name??x?")),
]


def test_reply_table():
    for line, expected in REPLIES:
        assert parse_instream_reply(line) == expected, line


def test_size_limit_is_a_failure_but_not_an_outage():
    got = parse_instream_reply(b"INSTREAM size limit exceeded. ERROR")
    assert isinstance(got, ScanFailure) and not got.outage
    assert "StreamMaxLength" in got.detail and "max_bytes" in got.detail


def test_other_errors_and_garbage_are_outages():
    for line in (b"Error processing command. ERROR", b"UNKNOWN COMMAND", b"stream:  FOUND",
                 b"HTTP/1.1 400 Bad Request", b"", b"stream: OKAY"):
        got = parse_instream_reply(line)
        assert isinstance(got, ScanFailure) and got.outage, line


def test_signature_names_are_cut_and_cleaned_for_a_reply_line():
    got = parse_instream_reply(b"stream: " + b"A" * 500 + b" FOUND")
    assert got == VirusReport("A" * clamd.MAX_SIGNATURE_NAME)


def test_ping():
    assert parse_ping_reply(b"PONG") is None
    assert isinstance(parse_ping_reply(b"PANG"), ScanFailure)


def test_close_without_reply_says_when_it_happened():
    assert "without an answer" in closed_without_reply(ReplyReader(), sent_all=True).detail
    assert "being sent" in closed_without_reply(ReplyReader(), sent_all=False).detail
    r = ReplyReader()
    r.feed(b"stream: OK")                             # no NUL: cut off, not trusted
    got = closed_without_reply(r, sent_all=True)
    assert isinstance(got, ScanFailure) and "mid-reply" in got.detail
    r = ReplyReader()
    r.feed(b"INSTREAM size limit exceeded. ERROR")    # an unterminated limit error still counts
    assert closed_without_reply(r, sent_all=False).outage is False


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_any_bytes_from_the_peer_give_a_result_never_an_exception(pieces):
    r = ReplyReader(max_reply=100)
    for piece in pieces:
        line = r.feed(piece)
        if line is not None:
            assert isinstance(parse_instream_reply(line), (VirusReport, ScanFailure))
            assert parse_ping_reply(line) is None or isinstance(parse_ping_reply(line),
                                                                ScanFailure)
            break
    else:
        assert isinstance(closed_without_reply(r, sent_all=True), ScanFailure)


def test_batches_copy_or_view_the_same_bytes_whatever_the_chunk_type():
    """scan/interfaces.batches serves both clients: bytes pieces for Twisted (rspamd's
    body), memoryviews for sendmsg (clamd's INSTREAM); a chunk's length counts in bytes."""
    from mailappliance.scan.interfaces import batches
    wide = memoryview(bytearray(b"abcdefgh")).cast("I")        # 2 items of 4 bytes
    chunks = [b"0123", wide, bytearray(b"xyz"), b"", memoryview(b"tail")]
    for views in (False, True):
        runs = list(batches(chunks, 5, views=views))
        assert [n for n, _ in runs] == [5, 5, 5, 4]
        assert all(n == sum(len(p) for p in parts) for n, parts in runs)
        assert b"".join(bytes(p) for _, parts in runs for p in parts) == \
            b"0123abcdefghxyztail"
        kinds = {type(p) for _, parts in runs for p in parts}
        assert kinds == ({bytes, memoryview} if views else {bytes})
