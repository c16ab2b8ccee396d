"""RCPT-style directory lookups: PostgreSQL against SQLite in the same run, and how fast a change
on one node reaches another node's cache.

    /work/venv/bin/python benchmarks/directory_bench.py [--lookups 3000] [--rounds 3]
        [--users 1000] [--changes 200]

What it does (issue 23), all on this machine:

1. starts a private PostgreSQL cluster (mailappliance.testing.postgres; fsync on, as in
   production; TCP on 127.0.0.1) and makes a SQLite store in a scratch folder on the real disk;
   fills both with the same directory: 3 domains, `--users` users, 200 aliases;
2. per round (backends take turns at going first), times `lookup_recipient` as SMTP asks it at
   each RCPT, one call at a time, `--lookups` calls per row, over a mix of 60 % users, 20 %
   aliases, 10 % unknown names in our domain and 10 % remote domains:
   - *uncached*: every address is looked up for the first time (a fresh random upper/lower
     case spelling of it, which is a new cache key for the same row), so each call is a query;
   - *cached*: the same addresses again: answered from the cache;
   - PostgreSQL *via thread pool*: what the reactor thread sees for a miss with
     `users.lookups.ReactorLookups` (Twisted thread pool, Deferred back to the reactor);
   - `is_granted` for the roaming grants the same two ways (SQLite: the JSON file's table in
     memory; PostgreSQL: the database, then its cache);
3. staleness: `--changes` times, node A (its own pool and watcher) changes an alias while node
   B holds the old answer cached; the time from A's commit returning to B's cache having
   forgotten it (B's watcher got the NOTIFY), p50/p99/max; the same for a roaming grant. The
   bound the code guarantees without any notification is pgstore.MAX_STALE_SECONDS.

Latencies are wall time of one call on an idle-as-possible shared 2-core machine (other
sessions' load shows as noise: see the load average printed with the table). Results go to
benchmarks/results/<time>-directory.{txt,json}.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (DEFAULT_SCRATCH, machine_info, percentile,  # noqa: E402
                               table, write_results)
from mailappliance.access.relay import RelayGrants  # noqa: E402
from mailappliance.testing.postgres import PostgresCluster  # noqa: E402
from mailappliance.users import pgstore  # noqa: E402
from mailappliance.users.directory import MISS  # noqa: E402
from mailappliance.users.store import UserStore  # noqa: E402

PW = "Bench-passw0rd"
DOMAINS = ("test.com", "example.net", "example.org")
# A change must reach the other node's cache within this, or the run says so (bounds waits).
PROPAGATION_TIMEOUT = 5.0
# Polling interval while waiting for a change to arrive (the measurement's resolution).
POLL_SLEEP = 0.00005


def populate(store, users: int) -> None:
    for d in DOMAINS:
        store.add_domain(d)
    for i in range(users):
        store.add_user(f"user{i}@{DOMAINS[i % 3]}", PW)
    for i in range(200):
        store.add_alias(f"alias{i}@{DOMAINS[i % 3]}", [f"user{i}@{DOMAINS[i % 3]}"])


def addresses(n: int, users: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            i = rng.randrange(users)
            a = f"user{i}@{DOMAINS[i % 3]}"
        elif r < 0.8:
            i = rng.randrange(200)
            a = f"alias{i}@{DOMAINS[i % 3]}"
        elif r < 0.9:
            a = f"nobody{rng.randrange(10**6)}@test.com"
        else:
            a = f"someone{rng.randrange(10**6)}@remote{rng.randrange(50)}.example"
        # A fresh spelling: a new cache key, the same row.
        out.append("".join(c.upper() if rng.random() < 0.5 else c for c in a))
    return out


def time_calls(fn, items) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for x in items:
        t = clock()
        fn(x)
        out.append((clock() - t) / 1000.0)
    return out


def stats(samples: list[float]) -> dict:
    return {"n": len(samples), "p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99),
            "mean_us": sum(samples) / len(samples) if samples else None}


def via_thread_pool(store, grants, addrs: list[str], ips: list[str]) -> dict:
    """Miss latency as the reactor thread sees it (ReactorLookups, a real Twisted pool)."""
    from twisted.internet import defer, reactor
    from twisted.python.threadpool import ThreadPool

    from mailappliance.users.lookups import ReactorLookups

    pool = ThreadPool(1, 4, name="bench")
    pool.start()
    lookups = ReactorLookups(store, grants, reactor, pool)
    result: dict = {}

    @defer.inlineCallbacks
    def run():
        try:
            for name, fn, items in (("recipient", lookups.lookup_recipient, addrs),
                                    ("grant", lookups.is_granted, ips)):
                samples = []
                for x in items:
                    t = time.perf_counter_ns()
                    yield defer.maybeDeferred(fn, x)
                    samples.append((time.perf_counter_ns() - t) / 1000.0)
                result[name] = samples
        finally:
            pool.stop()
            reactor.stop()
    reactor.callWhenRunning(run)
    reactor.run()
    return result


def _yield_gil() -> None:
    # Poll with a short sleep, not a busy loop: a spinning thread keeps the GIL for Python's
    # whole switch interval (5 ms) and would delay the very watcher thread being timed.
    time.sleep(POLL_SLEEP)


def propagation(a_store, b_store, a_grants, b_grants, changes: int) -> dict:
    """Seconds from A's commit returning to B's cache forgetting the old answer (resolution:
    POLL_SLEEP plus a thread switch)."""
    out = {"alias": [], "grant": []}
    b_store.sync()
    for i in range(changes):
        addr = f"moving{i}@test.com"
        assert b_store.lookup_recipient(addr) == "unknown"
        while b_store.peek_recipient(addr) is MISS:      # cached once the watcher is fresh
            b_store.lookup_recipient(addr)
        a_store.add_alias(addr, ["user0@test.com"])
        t = time.perf_counter()
        while b_store.peek_recipient(addr) is not MISS:
            _yield_gil()
            if time.perf_counter() - t > PROPAGATION_TIMEOUT:
                raise RuntimeError("a change did not reach the other node's cache in time")
        out["alias"].append(time.perf_counter() - t)
        ip = f"198.51.100.{i % 250}"
        b_grants.is_granted(ip)
        while b_grants.peek(ip) is MISS:
            b_grants.is_granted(ip)
        before = b_grants.peek(ip)
        a_grants.grant(ip, 600 + i)
        t = time.perf_counter()
        while b_grants.peek(ip) == before and b_grants.peek(ip) is not MISS:
            _yield_gil()
            if time.perf_counter() - t > PROPAGATION_TIMEOUT:
                raise RuntimeError("a grant did not reach the other node's cache in time")
        out["grant"].append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lookups", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)

    scratch = Path(tempfile.mkdtemp(prefix="directory-bench-", dir=DEFAULT_SCRATCH))
    cluster = PostgresCluster(fsync=True)
    stores = []
    try:
        t0 = time.perf_counter()
        cluster.start()
        started = time.perf_counter() - t0
        dbname = cluster.create_database("bench")
        uri = cluster.uri(dbname)
        sqlite = UserStore(scratch / "sqlite", bcrypt_cost=4)
        pg = pgstore.PgUserStore(uri, scratch / "boxes", bcrypt_cost=4)
        stores += [sqlite, pg]
        print(f"PostgreSQL up in {started:.2f} s; filling both stores ...", flush=True)
        populate(sqlite, args.users)
        populate(pg, args.users)
        file_grants = RelayGrants(scratch / "relay-grants.json")
        pg_grants = pgstore.PgRelayGrants(pg.db)
        grant_ips = [f"203.0.113.{i}" for i in range(1, 251)]
        for ip in grant_ips[::2]:
            file_grants.grant(ip, 3600)
            pg_grants.grant(ip, 3600)
        pg.sync()

        rows: dict[tuple, list[float]] = {}
        for rnd in range(args.rounds):
            order = [("sqlite", sqlite, file_grants), ("postgresql", pg, pg_grants)]
            if rnd % 2:
                order.reverse()
            for name, store, grants in order:
                addrs = addresses(args.lookups, args.users, rng)
                rows.setdefault((name, "lookup_recipient", "uncached"), []).extend(
                    time_calls(store.lookup_recipient, addrs))
                rows.setdefault((name, "lookup_recipient", "cached"), []).extend(
                    time_calls(store.lookup_recipient, addrs))
                if name == "postgresql":
                    pg.db.grants_cache.invalidate()
                ips = [rng.choice(grant_ips) for _ in range(args.lookups)]
                rows.setdefault((name, "is_granted", "uncached" if name == "postgresql"
                                 else "in memory"), []).extend(
                    time_calls(grants.is_granted, sorted(set(ips), key=ips.index)))
                rows.setdefault((name, "is_granted", "cached" if name == "postgresql"
                                 else "in memory"), []).extend(
                    time_calls(grants.is_granted, ips))

        # The reactor's view of a PostgreSQL miss (one run: a reactor starts only once).
        pg.db.invalidate_all()
        seen = via_thread_pool(pg, pg_grants, addresses(args.lookups, args.users, rng),
                               [f"192.0.2.{i}" for i in range(1, 250)])
        rows[("postgresql", "lookup_recipient", "uncached via thread pool")] = seen["recipient"]
        rows[("postgresql", "is_granted", "uncached via thread pool")] = seen["grant"]

        # Propagation between two nodes (two pools, two watchers).
        node_a = pgstore.PgUserStore(uri, scratch / "boxes", bcrypt_cost=4)
        stores.append(node_a)
        moved = propagation(node_a, pg, pgstore.PgRelayGrants(node_a.db), pg_grants,
                            args.changes)
    finally:
        for s in stores:
            s.close()
        cluster.destroy()
        shutil.rmtree(scratch, ignore_errors=True)

    lines = ["RCPT-style lookups, one call at a time (microseconds)", ""]
    body = []
    for (backend, call, how), samples in rows.items():
        s = stats(samples)
        body.append([backend, call, how, s["n"], f"{s['p50_us']:.1f}", f"{s['p99_us']:.1f}",
                     f"{s['mean_us']:.1f}"])
    lines.append(table(["backend", "call", "path", "n", "p50 us", "p99 us", "mean us"], body))
    lines += ["", "A change on node A seen by node B's cache (LISTEN/NOTIFY), milliseconds", ""]
    prop = []
    for what, secs in moved.items():
        ms = [x * 1000 for x in secs]
        prop.append([what, len(ms), f"{percentile(ms, 50):.2f}", f"{percentile(ms, 99):.2f}",
                     f"{max(ms):.2f}"])
    lines.append(table(["change", "n", "p50 ms", "p99 ms", "max ms"], prop))
    lines += ["", f"guaranteed bound without a notification: "
              f"{pgstore.MAX_STALE_SECONDS:g} s (pgstore.MAX_STALE_SECONDS)",
              f"machine: {machine_info()}",
              f"command: {' '.join(sys.argv)}"]
    text = "\n".join(lines)
    print(text)
    path = write_results("directory", text, {
        "args": vars(args),
        "rows": {" / ".join(k): stats(v) for k, v in rows.items()},
        "propagation_s": moved, "machine": machine_info()})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
