"""The clamd client's own cost per scan beside clamd's, no SMTP server in between.

    PYTHONPATH=. /work/venv/bin/python benchmarks/scan_client_bench.py [--messages 2000]
        [--concurrency 20]

Starts a private clamd (tests/scanners.py: the test signature database, StreamMaxLength
1 MiB), then scans the same clean message N times with `ClamdScanner`, `concurrency` at a time,
for 2 KiB and 100 KiB messages, and prints scans/s, this process's CPU per scan (os.times) and
clamd's CPU per scan (/proc/PID/stat). The issue-21 end-to-end benchmark (SMTP sessions with
scanning on and off) is a separate harness; this one isolates the client.

With the tiny test database clamd's own cost per message is far below what it is with the
official database (millions of signatures), so the ratio printed here is the worst case for
our share.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, task  # noqa: E402

from mailappliance.scan.client import ClamdScanner  # noqa: E402
from tests.scanners import ClamdDaemon  # noqa: E402


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def run(reactor, args) -> None:
    daemon = ClamdDaemon(Path(tempfile.mkdtemp(prefix="scanbench-")) / "clamd").start()
    try:
        scanner = ClamdScanner(daemon.endpoint, reactor, timeout=30)
        for size in (2048, 100 * 1024):
            msg = b"Subject: bench\n\n" + (b"a" * 75 + b"\n") * (size // 76)
            n = args.messages if size <= 2048 else max(1, args.messages // 4)
            sem = defer.DeferredSemaphore(args.concurrency)
            c0, d0, t0 = own_cpu(), daemon.cpu_seconds(), time.monotonic()
            results = await defer.gatherResults([sem.run(scanner.scan, msg) for _ in range(n)])
            c1, d1, t1 = own_cpu(), daemon.cpu_seconds(), time.monotonic()
            bad = [r for r in results if getattr(r, "signature", "x") is not None]
            ours, theirs = 1e6 * (c1 - c0) / n, 1e6 * (d1 - d0) / n
            print(f"{size:>6} B x {n}: {n / (t1 - t0):6.0f} scans/s   client {ours:4.0f} us/scan"
                  f"   clamd {theirs:4.0f} us/scan   client/clamd {ours / theirs:4.2f}"
                  f"{'   FAILURES: %d' % len(bad) if bad else ''}")
    finally:
        daemon.cleanup()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=20)
    args = p.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
