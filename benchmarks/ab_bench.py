"""Two versions of our server side by side: end to end with smtp-source, alternating pairs.

    python benchmarks/ab_bench.py --a 7251975 --b HEAD [--pairs 5] [--sessions 20]
        [--messages 3000] [--size 2048] [--config-a FILE] [--config-b FILE]

For a change that must not cost anything (a refactor) or whose cost is the question (signing on
against off: same source, two configurations). Each pair runs A and B back to back, taking turns
at going first; each run is a fresh server in a fresh scratch folder, sent `--messages` messages
by postfix's smtp-source (a new connection per message), and counts only when every message is
found on disk (Maildir or still committed in the queue). The rate is messages / (smtp-source's
wall time + the time until the queue is empty), i.e. end to end; CPU per message is the server's
whole process tree (utime + stime). The table gives each pair's B/A ratio, the median and range.
Machine drift between pairs cancels in the per-pair ratio; read a pair during which other
processes were busy (the "others" column, % of one core) with care.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (DEFAULT_SCRATCH, RESULTS_DIR, HeaderCache, Meter, OurServer,  # noqa: E402
                               cpu_seconds, prepare_source, run_smtp_source, settle,
                               system_busy_seconds)

# smtp-source gives up on a run after this long; generous for 100 KiB messages on a busy machine.
RUN_TIMEOUT = 600.0


class ConfiguredServer(OurServer):
    """OurServer with extra TOML appended (e.g. [dkim] or [verify] for an on/off comparison)."""

    def __init__(self, root: Path, extra: str, pythonpath: str | None) -> None:
        env = {"PYTHONPATH": pythonpath} if pythonpath else None
        super().__init__(root, env=env)
        self.proc.config_text += extra


def one_run(label: str, root: Path, extra: str, pythonpath: str | None, args) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath        # the `mailappliance` commands too
    try:
        server = ConfiguredServer(root, extra, pythonpath).start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        busy0 = system_busy_seconds()
        with Meter(server.pid, tree=True) as meter:
            t0 = time.monotonic()
            res = run_smtp_source(server.port, args.sessions, args.messages, args.size, RUN_TIMEOUT)
            settle(server, args.messages)
            wall = time.monotonic() - t0
        busy = system_busy_seconds() - busy0
        cpu = meter.cpu
        found = HeaderCache("message-id").ids(server.message_files())
    finally:
        server.stop()
    # smtp-source's messages only: OurServer.start's check sends one of its own.
    delivered = min(len(found), args.messages)
    others = max(0.0, busy - cpu - res["client_cpu"]) / wall * 100
    return {"label": label, "rate": delivered / wall, "delivered": delivered,
            "sent": args.messages, "cpu_ms": cpu / max(delivered, 1) * 1000,
            "others_pct": others, "rc": res["rc"], "stderr": res["stderr"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="HEAD", help="source of A: commit or directory (default HEAD)")
    ap.add_argument("--b", default=None, help="source of B (default: same as A)")
    ap.add_argument("--config-a", type=Path, help="TOML appended to A's configuration")
    ap.add_argument("--config-b", type=Path, help="TOML appended to B's configuration")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    args = ap.parse_args(argv)

    scratch = args.scratch / f"ab-bench-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    sides = []
    for name, source, config in (("A", args.a, args.config_a), ("B", args.b or args.a, args.config_b)):
        saved = os.environ.pop("PYTHONPATH", None)
        label = prepare_source(source, scratch / name)
        path = os.environ.get("PYTHONPATH")
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        extra = config.read_text() if config else ""
        sides.append((name, f"{label} {config or ''}".strip(), extra, path))

    rows = []
    for pair in range(args.pairs):
        order = sides if pair % 2 == 0 else sides[::-1]
        runs = {}
        for name, label, extra, path in order:
            runs[name] = one_run(label, scratch / f"run-{name}", extra, path, args)
            print(f"pair {pair + 1} {name}: {runs[name]['rate']:.1f} msg/s, "
                  f"{runs[name]['cpu_ms']:.2f} ms CPU/msg, "
                  f"{runs[name]['delivered']}/{args.messages} found, "
                  f"others {runs[name]['others_pct']:.0f} %", flush=True)
        rows.append(runs)

    ratios = [r["B"]["rate"] / r["A"]["rate"] for r in rows]
    cpu_ratios = [r["B"]["cpu_ms"] / r["A"]["cpu_ms"] for r in rows]
    lines = [f"A = {sides[0][1]}", f"B = {sides[1][1]}",
             f"{args.sessions} sessions, {args.size} bytes, {args.messages} messages per run",
             "pair  A msg/s  B msg/s  B/A   A CPU ms  B CPU ms  found A/B  others A/B %"]
    for i, r in enumerate(rows):
        a, b = r["A"], r["B"]
        lines.append(f"{i + 1:>4}  {a['rate']:7.1f}  {b['rate']:7.1f}  {b['rate'] / a['rate']:.2f}x"
                     f"  {a['cpu_ms']:8.2f}  {b['cpu_ms']:8.2f}  {a['delivered']}/{b['delivered']}"
                     f"  {a['others_pct']:.0f}/{b['others_pct']:.0f}")
    lines.append(f"B/A msg/s: median {statistics.median(ratios):.2f}x "
                 f"(range {min(ratios):.2f}-{max(ratios):.2f}); "
                 f"B/A CPU per message: median {statistics.median(cpu_ratios):.2f}x")
    lost = [r[s]["sent"] - r[s]["delivered"] for r in rows for s in "AB"]
    if any(lost):
        lines.append(f"WARNING: messages not found on disk in some runs: {lost}")
    text = "\n".join(lines)
    print(text)
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS_DIR / f"{stamp}-ab_bench.txt").write_text(text + "\n")
    (RESULTS_DIR / f"{stamp}-ab_bench.json").write_text(json.dumps(rows, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any(lost) else 0


if __name__ == "__main__":
    sys.exit(main())
