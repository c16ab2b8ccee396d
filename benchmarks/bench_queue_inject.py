"""Injection commits/s through the real Injector (thread pool, group commit) on this disk.

    python benchmarks/bench_queue_inject.py [--messages 4000] [--concurrency 20]
        [--size 2048] [--threads 10] [--dir /var/tmp/...]

Keeps `concurrency` commits in flight (like 20 SMTP sessions each waiting for its 250) and
reports commits/s, directory fsyncs per commit and latency p50/p99. Also runs the blocking
one-at-a-time `QueueStore.inject` (what a serial design gets) for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet import defer, reactor  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from mailappliance.queue.inject import Injector  # noqa: E402
from mailappliance.queue.store import QueueStore  # noqa: E402


def serial(store: QueueStore, n: int, body: bytes) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        store.inject(body, "a@test.com", ["b@test.com"], trigger=False)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=10)
    ap.add_argument("--serial", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a tempdir)")
    ap.add_argument("--busy", type=float, default=0.0,
                    help="keep the reactor thread this busy (0..0.95) with pure-Python work "
                         "in 300 us slices, as a CPU-bound SMTP server would")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bench-queue-", dir=args.dir)
    body = (b"x" * 76 + b"\n") * (args.size // 77) + b"y" * (args.size % 77)

    pool = ThreadPool(2, args.threads, name="bench")
    pool.start()
    store = QueueStore(os.path.join(base, "q1"))
    inj = Injector(store, reactor, pool)
    latencies: list[float] = []
    result = {}

    @defer.inlineCallbacks
    def sender(count: int):
        for _ in range(count):
            t = time.perf_counter()
            w = inj.begin()
            w.write(body)
            yield w.commit("a@test.com", ["b@test.com"], "bench")
            latencies.append(time.perf_counter() - t)

    @defer.inlineCallbacks
    def run():
        try:
            per = args.messages // args.concurrency
            t0 = time.perf_counter()
            yield defer.gatherResults([sender(per) for _ in range(args.concurrency)])
            result["elapsed"] = time.perf_counter() - t0
            result["n"] = per * args.concurrency
        finally:
            reactor.stop()

    def burn():
        if result.get("n"):
            return
        t = time.perf_counter()
        while time.perf_counter() - t < 0.0003:
            pass
        reactor.callLater(0.0003 * (1 - args.busy) / args.busy, burn)

    if args.busy > 0:
        reactor.callWhenRunning(burn)
    reactor.callWhenRunning(run)
    reactor.run()
    pool.stop()
    assert len(store.list_ids()) == result["n"]
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    print(f"group commit: {result['n']} msgs of {args.size} B, {args.concurrency} in flight, "
          f"{args.threads} threads, reactor busy {args.busy:.0%}: {result['n'] / result['elapsed']:.0f} commits/s, "
          f"{inj.stats['dir_syncs'] / inj.stats['commits']:.2f} dir fsyncs/commit, "
          f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms")
    if args.serial:
        rate = serial(QueueStore(os.path.join(base, "q2")), args.serial, body)
        print(f"serial blocking inject: {args.serial} msgs: {rate:.0f} commits/s")
    shutil.rmtree(base)


if __name__ == "__main__":
    main()
