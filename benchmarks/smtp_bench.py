"""SMTP acceptance benchmark: mailappliance vs aiosmtpd (Maildir + fsync), same run, loopback.

    python benchmarks/smtp_bench.py [--scale 1.0] [--idle 1000] [--profile]
        [--pairs 3] [--only ours|aiosmtpd] [--aiosmtpd-executor N] [--scratch /var/tmp] [--keep]
        [--source HEAD|COMMIT|DIR]

For each of (1, 20) sessions x (2 KiB, 100 KiB) messages, postfix's smtp-source sends M
messages (a new connection per message) to each server in turn; messages/s = M / wall time
of smtp-source.  Each configuration is measured as --pairs pairs (default 3), the servers
taking turns at going first; the table gives the medians and the range of the per-pair
ratios, because this shared machine's speed drifts by up to 2x within minutes.  After each run
every message is looked for on disk by its Message-Id (smtp-source makes one per message): for
mailappliance in its Maildir or still in queue/mess, for aiosmtpd in its Maildir; the table
shows found/sent and duplicates.  Before the load runs, on the freshly started servers: 1,000
idle connections (each reads the 220 greeting and stays silent) and each server's RSS before
and with them.

Each server is started fresh in a scratch folder on the real disk and stopped by PID.  Results
are printed and written to benchmarks/results/<time>-smtp.{txt,json}.  Targets (issue 3): at
20 sessions / 2 KiB at least 2x aiosmtpd's messages/s; under 50 KiB RSS per idle connection.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import shutil
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (DEFAULT_SCRATCH, AiosmtpdPeer, HeaderCache,  # noqa: E402
                               Meter, OurServer, ServerUnavailable, fmt, idle_rss,
                               machine_info, prepare_source, py_spy_record, ratio,
                               run_smtp_source, settle, profile_lines, table, wait_quiet,
                               write_results)

# (sessions, message bytes, messages at --scale 1): sized so each run lasts a few seconds
# at the rates PEERS.md reports (hundreds of msg/s), long enough to average out the disk's
# fsync latency switching between 0.3 and 1.2 ms.
MATRIX = [
    (1, 2048, 1000),
    (20, 2048, 4000),
    (1, 102400, 500),
    (20, 102400, 1500),
]
IDLE_CONNECTIONS = 1000
# smtp-source gets this many seconds per message (plus a floor) before it is killed: even at
# 10 msg/s a run finishes; anything slower is a hang, reported as such.
SECONDS_PER_MESSAGE = 0.1
MIN_RUN_TIMEOUT = 60.0
PROFILE_SECONDS = 8
# Messages in the profiled run: enough to keep 20 sessions busy for longer than PROFILE_SECONDS.
PROFILE_MESSAGES = 8000
# A run during which other processes on the shared machine used more than this much CPU (% of
# one core) is "disturbed" and its pair is measured again (--attempts).
DISTURBED_PCT = 25.0
TARGET_RATIO = 2.0          # issue 3: >= 2x aiosmtpd at 20 sessions, 2 KiB
TARGET_IDLE_KIB = 50.0      # issue 3: < 50 KiB RSS per idle connection


def one_run(server, sessions: int, size: int, messages: int, ids: HeaderCache,
            profile_out: Path | None = None) -> dict:
    before = ids.ids(server.message_files())
    timeout = max(MIN_RUN_TIMEOUT, messages * SECONDS_PER_MESSAGE)
    spy = None
    with Meter(server.pid, tree=True) as m:
        if profile_out is not None:
            spy = py_spy_record(server.pid, PROFILE_SECONDS, profile_out)
        res = run_smtp_source(server.port, sessions, messages, size, timeout)
    if spy is not None:
        try:
            _, err = spy.communicate(timeout=PROFILE_SECONDS + 30)
            res["py_spy_rc"] = spy.returncode
            res["py_spy_err"] = err.decode(errors="replace")[-300:]
        except Exception as e:  # noqa: BLE001 - report, never hang on the profiler
            spy.kill()
            res["py_spy_err"] = repr(e)
    waited = settle(server)
    after = ids.ids(server.message_files())
    new = after - before
    res.update({
        "server": server.name, "sessions": sessions, "size": size, "sent": messages,
        "rate": messages / res["wall"] if res["rc"] == 0 else None,
        "found": len(new), "duplicates": sum(n - 1 for n in new.values() if n > 1),
        "pending_after_settle": server.pending(), "settle_seconds": round(waited, 1),
        "server_cpu": m.cpu, "server_cpu_pct": 100.0 * m.cpu / m.wall,
        "peak_rss_kib": m.peak_rss_kib,
        "machine_busy_pct": m.system_busy_pct,
        # CPU used meanwhile by everything except this server and smtp-source (the bench
        # itself is idle while smtp-source runs): other people's work on the shared machine.
        "others_cpu_pct": max(0.0, m.system_busy_pct - 100.0 * (m.cpu + res["client_cpu"])
                              / m.wall),
    })
    return res


def measure_pair(servers: dict, caches: dict, sessions: int, size: int, count: int,
                 pair_no: int, args) -> list[dict]:
    """One run of each server for one configuration, back to back after waiting for a quiet
    machine; odd pairs run the servers in the other order (the shared machine's speed drifts,
    so neither server always gets the later minutes). A pair disturbed by other people's load
    is measured again (up to --attempts times) and the least disturbed one is kept."""
    order = list(servers.items())
    if pair_no % 2:
        order.reverse()
    best = None
    for attempt in range(1, args.attempts + 1):
        wait_quiet(args.quiet_wait)
        pair = []
        for kind, srv in order:
            r = one_run(srv, sessions, size, count, caches[kind])
            r["attempt"] = attempt
            r["pair"] = pair_no
            pair.append(r)
            print(f"{kind}: {sessions} sessions x {size} B (pair {pair_no + 1}): "
                  f"{fmt(r['rate'], 1)} msg/s, found {r['found']}/{count}, rc={r['rc']}, "
                  f"others {r['others_cpu_pct']:.0f}% {r['stderr'][:200]}", flush=True)
            if r["rc"] != 0 and hasattr(srv, "log_tail"):
                print(srv.log_tail(), flush=True)
        others = [r["others_cpu_pct"] for r in pair]
        # Keep the pair with the least other load in total.
        if best is None or sum(others) < best[0]:
            best = (sum(others), pair)
        if max(others) <= DISTURBED_PCT:
            break
        print(f"  disturbed ({max(others):.0f}% other CPU), attempt {attempt}", flush=True)
    return best[1]


def start(kind: str, scratch: Path, args):
    if kind == "ours":
        return OurServer(scratch / "mailappliance").start()
    return AiosmtpdPeer(scratch / "aiosmtpd", executor=args.aiosmtpd_executor).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    ap.add_argument("--idle", type=int, default=IDLE_CONNECTIONS)
    ap.add_argument("--profile", action="store_true",
                    help="after the measured runs, one more 20-session 2 KiB run of our "
                    "server under py-spy; hot spots in the report")
    ap.add_argument("--only", choices=("ours", "aiosmtpd"))
    ap.add_argument("--aiosmtpd-executor", type=int, default=0,
                    help="aiosmtpd peer: threads for Maildir writes (0 = inline, the default)")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--pairs", type=int, default=3,
                    help="runs of each server per configuration, alternating which goes "
                    "first; the table gives medians and the range of the per-pair ratios")
    ap.add_argument("--attempts", type=int, default=3,
                    help="measure a configuration again when other load disturbed it")
    ap.add_argument("--quiet-wait", type=float, default=300.0,
                    help="seconds to wait at most for the shared machine to be quiet first")
    ap.add_argument("--source", help="run our server from a commit (e.g. HEAD, via git "
                    "archive) or a directory instead of the working tree")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="smtp-bench-", dir=args.scratch))
    args.source_used = prepare_source(args.source, scratch)
    kinds = [args.only] if args.only else ["ours", "aiosmtpd"]
    servers, unavailable, results, idle, profiled = {}, {}, [], {}, []
    profile_path = scratch / "py-spy-ours-20x2k.txt"
    try:
        for kind in kinds:
            try:
                servers[kind] = start(kind, scratch, args)
                print(f"{kind}: listening on 127.0.0.1:{servers[kind].port} "
                      f"(pid {servers[kind].pid})", flush=True)
            except ServerUnavailable as e:
                unavailable[kind] = str(e)
                print(f"{kind}: UNAVAILABLE: {e}", flush=True)
        # Idle connections first, on freshly started servers (after one warm-up message):
        # RSS growth then reflects the connections, not heap left over from the load runs.
        for kind, srv in servers.items():
            idle[kind] = idle_rss(srv, args.idle)
            print(f"{kind}: idle {idle[kind]}", flush=True)
            settle(srv)
        caches = {k: HeaderCache("message-id") for k in servers}
        for sessions, size, base_count in MATRIX:
            count = max(1, int(base_count * args.scale))
            for pair_no in range(args.pairs):
                results.extend(measure_pair(servers, caches, sessions, size, count, pair_no,
                                            args))
        if args.profile and "ours" in servers:
            # An extra run under the profiler, after the measured ones: py-spy stops the process
            # for each sample, so this run's rate is not comparable and is not in the table.
            # Not scaled: the profiler needs PROFILE_SECONDS of load whatever --scale says.
            r = one_run(servers["ours"], 20, 2048, PROFILE_MESSAGES, caches["ours"],
                        profile_path)
            r["under_profiler"] = True
            profiled.append(r)
            print(f"ours under py-spy: {fmt(r['rate'], 1)} msg/s "
                  f"{r.get('py_spy_err', '')[:200]}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()

    text = report(results, idle, unavailable, args, profile_path if args.profile else None)
    print(text)
    out = write_results("smtp", text, {"machine": machine_info(), "results": results,
                                       "idle": idle, "unavailable": unavailable,
                                       "profiled_run": profiled,
                                       "args": vars(args)})
    print(f"\nwritten: {out}")
    if args.profile and profile_path.exists():
        dest = out.with_name(out.stem + "-py-spy.txt")
        shutil.copy(profile_path, dest)
        print(f"profile (folded stacks): {dest}")
    if args.keep:
        print(f"scratch kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if not unavailable else 1


def pairs_of(results: list[dict], sessions: int, size: int) -> list[tuple]:
    """(our run, aiosmtpd's run) of each pair of one configuration; either may be None."""
    by: dict[int, dict] = {}
    for r in results:
        if r["sessions"] == sessions and r["size"] == size:
            by.setdefault(r.get("pair", 0), {})[r["server"]] = r
    return [(p.get("mailappliance"), p.get("aiosmtpd")) for _, p in sorted(by.items())]


def summary(pairs: list[tuple]) -> dict:
    """Medians over the pairs of one configuration, and the per-pair ratios."""
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None
    ours = [o for o, _ in pairs if o]
    peer = [a for _, a in pairs if a]
    return {
        "ours_rate": med(r["rate"] for r in ours),
        "peer_rate": med(r["rate"] for r in peer),
        "ratios": [o["rate"] / a["rate"] for o, a in pairs
                   if o and a and o["rate"] and a["rate"]],
        "ours_cpu": med(r["server_cpu_pct"] for r in ours),
        "peer_cpu": med(r["server_cpu_pct"] for r in peer),
        "ours": ours, "peer": peer,
    }


def _disk(runs: list[dict]) -> str:
    if not runs:
        return "-"
    s = f"{sum(r['found'] for r in runs)}/{sum(r['sent'] for r in runs)}"
    dup = sum(r["duplicates"] for r in runs)
    if dup:
        s += f" ({dup} dup)"
    if any(r["rc"] != 0 for r in runs):
        s += " ERR"
    return s


def report(results, idle, unavailable, args, profile_path) -> str:
    rows = []
    for sessions, size, _ in MATRIX:
        m = summary(pairs_of(results, sessions, size))
        rs = m["ratios"]
        rows.append([f"{sessions} x {size // 1024} KiB", fmt(m["ours_rate"], 1),
                     fmt(m["peer_rate"], 1),
                     f"{statistics.median(rs):.2f}x" if rs else "-",
                     f"{min(rs):.2f}-{max(rs):.2f}x ({len(rs)})" if rs else "-",
                     _disk(m["ours"]), _disk(m["peer"]), fmt(m["ours_cpu"]), fmt(m["peer_cpu"]),
                     "/".join(fmt(max((r["others_cpu_pct"] for r in runs), default=None))
                              for runs in (m["ours"], m["peer"]))])
    lines = ["SMTP acceptance (smtp-source, new connection per message, 127.0.0.1)",
             f"command: {' '.join(sys.argv)}",
             f"our code: {args.source_used or 'working tree'}", "",
             table(["sessions x size", "ours msg/s", "aiosmtpd msg/s", "ratio",
                    "ratio range (pairs)", "ours on disk", "aiosmtpd on disk", "ours CPU%",
                    "aiosmtpd CPU%", "others CPU%"], rows),
             "(medians over the pairs; ratio = median of the per-pair ratios; CPU% of one "
             "core; 'others' = the most the rest of the shared machine used during a run, "
             "ours/aiosmtpd; on disk: found/sent over all pairs)"]
    if idle:
        lines += ["", table(["server", "idle conns", "greeted", "RSS before KiB",
                             "RSS idle KiB", "KiB/conn"],
                            [[k, v["connections"], v["greeted"], v["rss_before_kib"],
                              v["rss_idle_kib"], fmt(v["kib_per_conn"], 1)]
                             for k, v in idle.items()])]
    m = summary(pairs_of(results, 20, 2048))
    verdicts = []
    if m["ratios"]:
        r = statistics.median(m["ratios"])
        ok = r >= TARGET_RATIO and all(o["found"] == o["sent"] for o in m["ours"])
        verdicts.append(f"target 20 x 2 KiB >= {TARGET_RATIO}x aiosmtpd: "
                        f"{'MET' if ok else 'NOT MET'} (median {r:.2f}x over "
                        f"{len(m['ratios'])} pairs)")
    if "ours" in idle and idle["ours"]["kib_per_conn"] is not None:
        k = idle["ours"]["kib_per_conn"]
        verdicts.append(f"target < {TARGET_IDLE_KIB:.0f} KiB/idle connection: "
                        f"{'MET' if k < TARGET_IDLE_KIB else 'NOT MET'} ({k:.1f} KiB)")
    for kind, why in unavailable.items():
        verdicts.append(f"{kind}: not measured: {why}")
    if verdicts:
        lines += [""] + verdicts
    if profile_path is not None:
        lines += profile_lines(profile_path, PROFILE_SECONDS,
                               "hot spots, ours, 20 sessions x 2 KiB (extra run)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
