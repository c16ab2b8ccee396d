"""Hypothesis fuzzing of the SMTP core: any bytes in any pieces.

Properties: no exception escapes; while the session is open every complete command line gets
exactly one reply; buffered input stays bounded; DATA decoding is independent of how the bytes
are split and inverts dot-stuffing exactly.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from mailappliance.smtp import core, replies
from mailappliance.smtp.core import (
    CLOSED_EVENT, NEED_DATA, PAUSED, DataChunk, MessageEnd, RcptTo, ServerConnection)

HOST = "mx.test.com"

# Command-ish fragments, so random sessions get deep into the state machine.
FRAGMENTS = [b"HELO x", b"EHLO x", b"MAIL FROM:<a@b.example>", b"MAIL FROM:<>",
             b"RCPT TO:<u@test.com>", b"RCPT TO:<\"a@b\"@test.com>", b"DATA", b"RSET", b"NOOP",
             b"QUIT", b"VRFY x", b"STARTTLS", b"AUTH PLAIN", b"GET / HTTP/1.0", b".", b"..",
             b"\r\n", b"\n", b"\r", b"\0", b"\r\n.\r\n", b"\n.\r\n", b"\r.\r", b"x" * 999,
             b"x" * 1001, b" SIZE=99999999", b"\xff"]


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def run(conn: ServerConnection, pieces, rcpt_ok: bool):
    """Feed pieces, answering as an adapter would; check invariants after every piece."""
    out = [conn.send(replies.greeting(HOST))]
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is CLOSED_EVENT:
                break
            assert ev is not PAUSED            # we always answer at once
            if isinstance(ev, DataChunk):
                assert ev.data and b"\r" not in ev.data
                continue
            if isinstance(ev, RcptTo):
                reply = replies.RCPT_OK if rcpt_ok else replies.NOT_IN_RCPTHOSTS
            elif isinstance(ev, MessageEnd):
                reply = ev.reply or replies.queued(1, "1")
            else:
                reply = ev.reply or replies.Reply(334, None, "")
            out.append(conn.send(reply))
        # Bounded memory: in command mode less than a line, in data mode a few held-back bytes.
        if conn.state == core.DATA:
            assert conn.buffered <= 3
        elif not conn.closed:
            assert conn.buffered < core.MAX_COMMAND_LINE
    return b"".join(out)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(FRAGMENTS)), max_size=40),
       st.lists(st.integers(min_value=0), max_size=10), st.booleans())
def test_any_bytes_no_exception_and_bounded_buffer(parts, cuts, rcpt_ok):
    data = b"".join(parts)
    conn = ServerConnection(HOST, databytes=2000, max_recipients=3,
                            starttls_offered=True, auth_mechanisms=("PLAIN",))
    out = run(conn, chunks_of(data, cuts), rcpt_ok)
    assert out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-")


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=30).filter(lambda b: b"\n" not in b),
                          st.sampled_from([f for f in FRAGMENTS if b"\n" not in f])),
                max_size=30),
       st.lists(st.integers(min_value=0), max_size=8))
def test_one_reply_per_complete_line(lines, cuts):
    """With RCPT always refused the session never enters DATA, so every LF-terminated line is a
    command that gets exactly one reply (multi-line replies count once), until the session
    closes (QUIT, HTTP, error limit)."""
    data = b"".join(line + b"\r\n" for line in lines)
    conn = ServerConnection(HOST, databytes=2000, max_recipients=3, max_errors=10_000)
    fed = 0
    out = [conn.send(replies.greeting(HOST))]
    for piece in chunks_of(data, cuts):
        conn.receive_data(piece)
        fed += piece.count(b"\n")
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is CLOSED_EVENT:
                break
            if isinstance(ev, RcptTo):
                out.append(conn.send(replies.NOT_IN_RCPTHOSTS))
            else:
                out.append(conn.send(ev.reply or replies.Reply(535, None, "no")))
        final_lines = [ln for ln in b"".join(out).split(b"\r\n")[:-1] if ln[3:4] == b" "]
        if conn.closed:
            assert len(final_lines) - 1 <= fed
            return
        assert len(final_lines) - 1 == fed


body_line = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=500, deadline=None)
@given(st.lists(body_line, max_size=30), st.lists(st.integers(min_value=0), max_size=12))
def test_data_round_trip_independent_of_splitting(body, cuts):
    """Dot-stuff a message as a client does, split the wire bytes anywhere: the core gives back
    exactly the original lines, LF-terminated, and then reads the next command."""
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in body)
    wire += b".\r\nNOOP\r\n"
    conn = ServerConnection(HOST, databytes=10**9, max_recipients=3)
    conn.send(replies.greeting(HOST))
    conn.receive_data(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<u@test.com>\r\nDATA\r\n")
    for _ in range(4):
        ev = conn.next_event()
        conn.send(ev.reply or replies.RCPT_OK)
    got, ends, replies_after = [], [], []
    for piece in chunks_of(wire, cuts):
        conn.receive_data(piece)
        while (ev := conn.next_event()) not in (NEED_DATA, CLOSED_EVENT):
            if isinstance(ev, DataChunk):
                got.append(ev.data)
            elif isinstance(ev, MessageEnd):
                ends.append(ev)
                conn.send(replies.queued(1, "1"))
            else:
                replies_after.append(conn.send(ev.reply))
    assert b"".join(got) == b"".join(line + b"\n" for line in body)
    assert len(ends) == 1 and ends[0].size == sum(len(line) + 1 for line in body)
    assert replies_after == [b"250 ok\r\n"]
