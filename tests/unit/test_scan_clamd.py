"""clamd's INSTREAM framing and reply parsing (mailappliance/scan/clamd.py), no sockets."""

from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from mailappliance.scan import clamd
from mailappliance.scan.clamd import (
    END_OF_STREAM, INSTREAM, ReplyReader, closed_without_reply, instream_frames,
    parse_instream_reply, parse_ping_reply)
from mailappliance.scan.interfaces import ScanFailure, VirusReport


def unframe(frames: list[list[bytes]]) -> tuple[bytes, list[int]]:
    """Reassemble what clamd would read: the command, then length-prefixed chunks to 0."""
    wire = b"".join(b"".join(bytes(p) for p in f) for f in frames)
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
def test_frames_carry_the_message_exactly_in_bounded_chunks(chunks, size):
    frames = list(instream_frames(chunks, frame_bytes=size))
    data, sizes = unframe(frames)
    assert data == b"".join(chunks)
    assert all(0 < n <= size for n in sizes)
    assert all(n == size for n in sizes[:-1])          # only the last chunk is short
    assert frames[0] == [INSTREAM] and frames[-1] == [END_OF_STREAM]


def test_empty_message_is_command_and_end_marker_only():
    assert list(instream_frames([])) == [[INSTREAM], [END_OF_STREAM]]
    assert list(instream_frames([b"", b""])) == [[INSTREAM], [END_OF_STREAM]]


def test_a_chunk_that_fits_is_passed_on_without_a_copy():
    chunk = b"x" * 1000
    frames = list(instream_frames([chunk, b"y" * 10]))
    assert frames[1][1] is chunk


def test_frames_accept_memoryview_and_bytearray_chunks_and_write_bytes():
    frames = list(instream_frames([memoryview(b"abc"), bytearray(b"def")], frame_bytes=4))
    assert all(type(p) is bytes for f in frames for p in f)
    assert unframe(frames)[0] == b"abcdef"


def test_default_frame_is_64_kib():
    frames = list(instream_frames([b"a" * (clamd.FRAME_BYTES + 1)]))
    assert [struct.unpack(">I", f[0])[0] for f in frames[1:-1]] == [clamd.FRAME_BYTES, 1]


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
