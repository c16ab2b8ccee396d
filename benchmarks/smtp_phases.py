"""Where an SMTP session's time goes: per-command reply latency, ours vs aiosmtpd, same run.

    python benchmarks/smtp_phases.py [--sessions 20] [--messages 3000]
        [--size 2048] [--only ours|aiosmtpd] [--rounds 1]

A closed loop of `--sessions` asyncio clients sends `--messages` messages, a new connection
each, with smtp-source's command sequence and no pipelining (connect + greeting, HELO, MAIL,
RCPT, DATA, message + final dot, QUIT), and times every reply. It prints messages/s and the
p50/mean of each phase per server: the round trips of the protocol on one side, the commit
(end of DATA to the 250: queue file written and fsynced for us, the Maildir file for aiosmtpd)
on the other. Both servers start fresh in a scratch folder on the real disk (benchmarks.common:
`OurServer`, `AiosmtpdPeer`), listen on 127.0.0.1 only and are stopped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (DEFAULT_SCRATCH, AiosmtpdPeer, OurServer,  # noqa: E402
                               read_smtp_reply, settle)

PHASES = ("connect+220", "HELO", "MAIL", "RCPT", "DATA", "message+250", "QUIT")
# Bounds every wait for a reply: a server that stops answering ends the run with an error.
REPLY_TIMEOUT = 30.0


def message(size: int) -> bytes:
    head = b"From: a@test.com\r\nTo: test@test.com\r\nSubject: phases\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(0, (size - len(head)) // len(line)) + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    return await read_smtp_reply(reader, REPLY_TIMEOUT)


async def _session(port: int, body: bytes, times: dict[str, list[float]]) -> None:
    t = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                            REPLY_TIMEOUT)
    try:
        marks = [await _reply(reader)]
        now = time.monotonic()
        times["connect+220"].append(now - t)
        t = now
        for phase, data in zip(PHASES[1:], (b"HELO phases.test\r\n",
                                             b"MAIL FROM:<a@test.com>\r\n",
                                             b"RCPT TO:<test@test.com>\r\n", b"DATA\r\n",
                                             body, b"QUIT\r\n")):
            writer.write(data)
            marks.append(await _reply(reader))
            now = time.monotonic()
            times[phase].append(now - t)
            t = now
        bad = [m for m in marks if m[:1] not in (b"2", b"3")]
        if bad:
            raise ConnectionError(f"refused: {bad[0]!r}")
    finally:
        writer.close()


async def _run(port: int, sessions: int, messages: int, body: bytes) -> tuple[float, dict]:
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    left = [messages]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await _session(port, body, times)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    return messages / (time.monotonic() - t0), times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--only", choices=("ours", "aiosmtpd"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    args = ap.parse_args(argv)
    kinds = [args.only] if args.only else ["ours", "aiosmtpd"]
    body = message(args.size)
    for rnd in range(args.rounds):
        for kind in kinds:
            scratch = Path(tempfile.mkdtemp(prefix="smtp-phases-", dir=args.scratch))
            try:
                server = (OurServer(scratch / "mailappliance") if kind == "ours"
                          else AiosmtpdPeer(scratch / "aiosmtpd")).start()
                try:
                    rate, times = asyncio.run(_run(server.port, args.sessions, args.messages,
                                                   body))
                    settle(server)
                finally:
                    server.stop()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            print(f"{kind} (round {rnd}): {rate:.1f} msg/s, {args.sessions} sessions, "
                  f"{args.size} B", flush=True)
            for phase in PHASES:
                v = sorted(times[phase])
                print(f"  {phase:12} p50 {1000 * v[len(v) // 2]:7.2f} ms  "
                      f"mean {1000 * statistics.fmean(v):7.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
