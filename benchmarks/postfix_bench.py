"""Issue 19: mailappliance against Postfix end to end, alternating pairs, with this machine's ceilings.

    python benchmarks/postfix_bench.py [--pairs 5] [--cases 1x2k,20x2k,20x100k] [--scale 1.0]
        [--side ours --side postfix] [--source HEAD] [--no-ceiling] [--quiet-wait 60]

Each case (sessions x message size) is measured as `--pairs` pairs; a pair is one run of each
side back to back, the sides taking turns at going first (this shared machine's speed drifts by
up to 2x within minutes: only the per-pair ratios are compared). Every run starts its server
fresh in a fresh scratch folder on the real disk, then:

- load: postfix's smtp-source, a new connection per message, no pipelining:
  ``smtp-source -4 -M localhost -s SESSIONS -m MESSAGES -l BYTES -f a@test.com -t test@test.com``;
- rate: messages / (last arrival in Maildir/new - start of smtp-source), arrivals timestamped by
  an inotify watcher process (common.MaildirWatcher), so the time until the last message is in
  the mailbox counts, not only the 250s;
- verification: afterwards every message's Message-Id must be found in the Maildir (new/ or
  cur/); a run where one is missing is flagged and its rate counts only what was found;
- CPU per message: utime+stime of the server's whole process tree (Postfix: master and every
  child, reaped ones included) over the run, divided by the messages;
- others: the rest of the shared machine meanwhile (whole-machine busy time from /proc/stat
  minus the server, smtp-source and this harness), % of one core.

Sides (`--side`, twice; the ratio is the first over the second):
- ``ours``: `twistd -n mailappliance` configured as benchmarks/common.py OurServer (the
  benchmark configuration; ``ours+FILE`` appends TOML; ``ours@COMMIT`` runs a `git archive` of a
  commit); ``plain``: the configuration an operator would write for a fresh `pip install .`
  (hostname, data, the smtp listener, max_per_ip 40 so that 20 sessions from 127.0.0.1 are
  admitted: with 20, a new connection of smtp-source often arrives before the server has seen
  the close of the one before it, gets 421 and smtp-source gives up; everything else the product's defaults: SPF/DKIM/DMARC verification of internet
  mail, bcrypt cost 12); ``plain@COMMIT`` likewise; ``ours*K`` (also ``ours@COMMIT*K+FILE``)
  runs K independent servers side by side, each given 1/K of the sessions and messages, all
  verified, their CPU summed: the most K receiving processes could give, sharing nothing;
- ``postfix``: the private instance of benchmarks/peers/postfix.py (virtual Maildir, its
  defaults); ``postfix:KEY=VALUE,KEY=VALUE`` adds main.cf settings (e.g. in_flow_delay=0s).

Ceilings (unless --no-ceiling), measured in the same run between the cases:
- fsync ceiling: one thread appending 2 KiB to a file and fsyncing it, in a loop: the fsyncs per
  second of this disk, the bound of any strictly sequential durable write;
- floor_files (benchmarks/peers/floor_files.c) with 1 thread and with 20: the queue-then-Maildir
  file work in C with no SMTP, as one session and as 20 sessions would need it;
- any implementation on 2 cores: 2 / (floor_files + smtp-sink + smtp-source CPU per message), as
  benchmarks/ceiling_bench.py derives it.

Results: benchmarks/results/<time>-postfix.{txt,json}.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (DEFAULT_SCRATCH, HeaderCache, MaildirWatcher,  # noqa: E402
                               Meter, OurServer, PostfixPeer, ServerUnavailable, fmt,
                               machine_info, prepare_source, run_smtp_source, settle,
                               table, wait_quiet, write_results)
from benchmarks.common import count_new, wait_delivered  # noqa: E402

# name -> (sessions, bytes, messages at --scale 1): about 2-6 s per run here.
CASES = {"1x2k": (1, 2048, 600), "20x2k": (20, 2048, 3000), "20x100k": (20, 102400, 800)}
# Issue 19's targets per case: (msg/s ratio at least, CPU per message ratio at most).
TARGETS = {"1x2k": (1.0, 0.7), "20x2k": (1.5, 0.7), "20x100k": (1.0, 1.0)}
# The fsync ceiling: this many fsyncs of a 2 KiB append, one thread.
FSYNC_LOOPS = 300
WARM_UP_ID = b"<warm-up@bench.test>"

PLAIN_CONFIG = """\
hostname = "mx.bench.test"
data = "{data}"
default_domain = "test.com"
[listen]
smtp = ["tcp:0:interface=127.0.0.1"]
submission = []
pop3 = []
[smtp]
max_per_ip = 40
"""


class PlainServer(OurServer):
    """Our server with the configuration an operator writes for a fresh install."""

    name = "mailappliance (plain config)"

    def start(self) -> "PlainServer":
        self.root.mkdir(parents=True, exist_ok=True)
        text = PLAIN_CONFIG.format(data=self.data) + self.extra
        self.proc.config_path.write_text(text)
        write = self.proc._write_config
        self.proc._write_config = lambda: None        # keep the plain text
        try:
            return super().start()
        finally:
            self.proc._write_config = write


VERIFY_OFF = '\n[verify]\nspf = "off"\ndkim = "off"\ndmarc = "off"\n'


def _knows_verify(pythonpath: str) -> bool:
    path = Path(pythonpath.split(os.pathsep)[0]) / "mailappliance" / "config.py"
    try:
        return "[verify]" in path.read_text() or "class Verify" in path.read_text()
    except OSError:
        return True


class Side:
    """One side of the comparison, parsed from --side."""

    def __init__(self, spec: str, scratch: Path, default_source: str | None) -> None:
        self.spec = spec
        self.kind, self.extra, self.postfix_set, source = "postfix", "", [], default_source
        self.instances = 1
        if spec.startswith("postfix"):
            rest = spec[len("postfix"):].lstrip(":")
            self.postfix_set = [kv.strip() for kv in rest.split(",") if kv.strip()]
        else:
            head, _, extra_file = spec.partition("+")
            head, star, copies = head.rpartition("*")
            if not star:
                head, copies = copies, "1"
            self.instances = int(copies)
            if self.instances < 1:
                raise SystemExit(f"--side {spec!r}: *K needs K >= 1")
            self.kind, _, commit = head.partition("@")
            if self.kind not in ("ours", "plain"):
                raise SystemExit(f"--side {spec!r}: ours, plain or postfix")
            source = commit or source
            self.extra = "\n" + Path(extra_file).read_text() if extra_file else ""
        self.pythonpath = None
        self.source_label = None
        if self.kind != "postfix" and source:
            saved = os.environ.pop("PYTHONPATH", None)
            self.source_label = prepare_source(source, scratch / f"src-{len(spec)}-{abs(hash(spec))}")
            self.pythonpath = os.environ.get("PYTHONPATH")
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved

    def make(self, root: Path):
        if self.kind == "postfix":
            peer = PostfixPeer(root)
            if self.postfix_set:
                inst, extra = peer.inst, "".join(f"{kv}\n" for kv in self.postfix_set)
                setup = inst.setup

                def setup_more():
                    setup()
                    with open(inst.etc / "main.cf", "a") as f:
                        f.write("# postfix_bench --side\n" + extra)
                inst.setup = setup_more
            return peer
        env = {"PYTHONPATH": self.pythonpath} if self.pythonpath else None
        cls = PlainServer if self.kind == "plain" else OurServer
        srv = cls(root, env=env)
        srv.extra = self.extra
        if self.kind == "ours":
            srv.proc.config_text += self.extra
        if self.pythonpath and not _knows_verify(self.pythonpath):
            # Code from before [verify] existed (issue 20) rejects the section the test
            # harness adds: leave it out (that code verified nothing anyway).
            write = srv.proc._write_config

            def write_without_verify(proc=srv.proc, write=write):
                write()
                text = proc.config_path.read_text()
                proc.config_path.write_text(text.replace(VERIFY_OFF, "\n"))
            srv.proc._write_config = write_without_verify
        return srv

    def start(self, root: Path):
        saved = os.environ.get("PYTHONPATH")
        if self.pythonpath:
            os.environ["PYTHONPATH"] = self.pythonpath    # the `mailappliance` commands too
        try:
            return self.make(root).start()
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved


def one_run(side: Side, case: str, root: Path, scale: float) -> dict:
    sessions, size, base_count = CASES[case]
    messages = max(sessions, int(base_count * scale))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    root.chmod(0o755)
    # `ours*K`: K independent servers, each given its share of the sessions and messages:
    # what K receiving processes could do at most, with nothing shared between them.
    k = side.instances
    shares = [(sessions // k + (i < sessions % k), messages // k + (i < messages % k))
              for i in range(k)]
    servers = []
    try:
        for i in range(k):
            servers.append(side.start(root if k == 1 else root / f"instance{i}"))
        for server in servers:
            settle(server, 1)
        befores = [count_new(server.maildir) for server in servers]
        watchers = [MaildirWatcher(server.maildir / "new", root / f"arrivals{i}.txt")
                    for i, server in enumerate(servers)]
        for w in watchers:
            w.start()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        arrivals, overflow = {}, 0
        try:
            with Meter([server.pid for server in servers], tree=True) as meter:
                t0 = time.monotonic()
                results = [None] * k

                def load(i: int) -> None:
                    results[i] = run_smtp_source(servers[i].port, *shares[i], size,
                                                 timeout=max(120.0, messages * 0.5))
                    wait_delivered(servers[i].maildir, befores[i], shares[i][1])
                threads = [threading.Thread(target=load, args=(i,)) for i in range(k)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        finally:
            for w in watchers:
                got, lost = w.stop()
                arrivals.update(got)
                overflow += lost
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        ids: dict = {}
        for server, (_s, count) in zip(servers, shares):
            settle(server, count + 1)
            for mid, n in HeaderCache("message-id").ids(server.message_files()).items():
                ids[mid] = ids.get(mid, 0) + n
        ids.pop(WARM_UP_ID, None)
    finally:
        for server in servers:
            server.stop()
    res = {"rc": max((r["rc"] for r in results if r), default=-1),
           "stderr": " | ".join(r["stderr"] for r in results if r and r["stderr"]),
           "client_cpu": sum(r["client_cpu"] for r in results if r)}
    if any(r is None for r in results):
        res["rc"] = -1
    times = sorted(t for t in arrivals.values() if t >= t0)
    found = len(ids)
    got = min(len(times), found)
    harness = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    others = meter.system_busy_pct - 100.0 * (meter.cpu + res["client_cpu"] + harness) / meter.wall
    out = {
        "side": side.spec, "case": case, "sessions": sessions, "size": size, "sent": messages,
        "instances": k,
        "rc": res["rc"], "stderr": res["stderr"][-300:], "found": found,
        "duplicates": sum(n - 1 for n in ids.values() if n > 1), "inotify_overflows": overflow,
        "accept_rate": messages / max(r["wall"] for r in results) if res["rc"] == 0 else None,
        "rate": got / (times[got - 1] - t0) if got else None,
        "cpu_ms": 1000.0 * meter.cpu / max(found, 1),
        "server_cpu_pct": 100.0 * meter.cpu / meter.wall,
        "client_ms": 1000.0 * res["client_cpu"] / messages,
        "others_pct": max(0.0, others), "peak_rss_kib": meter.peak_rss_kib,
    }
    if found < messages or overflow:
        out["rate"] = found / meter.wall if out["rate"] is None else out["rate"] * found / messages
    return out


def fsync_ceiling(scratch: Path) -> dict:
    """fsyncs per second of a 2 KiB append, one thread (os.fsync releases the GIL)."""
    path = scratch / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = b"x" * 2048
        t0 = time.monotonic()
        for _ in range(FSYNC_LOOPS):
            os.write(fd, block)
            os.fsync(fd)
        wall = time.monotonic() - t0
    finally:
        os.close(fd)
        path.unlink()
    return {"fsyncs_per_s": FSYNC_LOOPS / wall, "ms_per_fsync": 1000.0 * wall / FSYNC_LOOPS}


def ceilings(scratch: Path, scale: float) -> dict:
    from benchmarks.ceiling_bench import build_floor, run_floor, run_sink
    out = {"fsync": fsync_ceiling(scratch)}
    try:
        exe = build_floor(scratch)
    except (OSError, subprocess.SubprocessError) as e:
        out["error"] = f"floor_files not built: {e}"
        return out
    n = max(100, int(3000 * scale))
    out["floor_1"] = run_floor(exe, scratch, 1, max(50, n // 5), 2048)
    out["floor_20"] = run_floor(exe, scratch, 20, n, 2048)
    out["floor_20_100k"] = run_floor(exe, scratch, 20, max(100, n // 4), 102400)
    sink = run_sink(20, n, 2048)
    out["sink"] = sink
    any_ms = out["floor_20"]["cpu_ms"] + sink["cpu_ms"] + sink["client_ms"]
    out["any_impl_2k"] = 1000.0 * (os.cpu_count() or 2) / any_ms
    return out


def summarize(pairs: list[dict], a: str, b: str) -> dict:
    rates = [p[a]["rate"] / p[b]["rate"] for p in pairs if p[a]["rate"] and p[b]["rate"]]
    cpus = [p[a]["cpu_ms"] / p[b]["cpu_ms"] for p in pairs if p[b]["cpu_ms"]]
    med = statistics.median
    return {"rate_ratios": rates, "cpu_ratios": cpus,
            "rate_median": med(rates) if rates else None,
            "cpu_median": med(cpus) if cpus else None,
            "a_rate": med([p[a]["rate"] for p in pairs if p[a]["rate"]] or [0]),
            "b_rate": med([p[b]["rate"] for p in pairs if p[b]["rate"]] or [0]),
            "a_cpu": med([p[a]["cpu_ms"] for p in pairs]),
            "b_cpu": med([p[b]["cpu_ms"] for p in pairs])}


def report(results: dict, ceil: list[dict], args, sides: list[Side]) -> str:
    a, b = sides[0].spec, sides[1].spec
    lines = [f"postfix_bench: A = {a} / B = {b}, smtp-source, new connection per message, "
             "every message verified in the Maildir; end to end (last arrival in new/)",
             f"command: {' '.join(sys.argv)}"]
    for s in sides:
        if s.source_label:
            lines.append(f"{s.spec}: code {s.source_label}")
    lines.append("")
    rows = []
    for case, pairs in results.items():
        for i, p in enumerate(pairs, 1):
            ra, rb = p[a], p[b]
            rows.append([case, i, p["first"], fmt(ra["rate"], 1), fmt(rb["rate"], 1),
                         f"{ra['rate'] / rb['rate']:.2f}x" if ra["rate"] and rb["rate"] else "-",
                         fmt(ra["cpu_ms"], 2), fmt(rb["cpu_ms"], 2),
                         f"{ra['cpu_ms'] / rb['cpu_ms']:.2f}x",
                         f"{ra['found']}/{ra['sent']} {rb['found']}/{rb['sent']}",
                         f"{ra['others_pct']:.0f}/{rb['others_pct']:.0f}"])
    lines.append(table(["case", "pair", "first", "A msg/s", "B msg/s", "A/B", "A CPU ms/msg",
                        "B CPU ms/msg", "A/B CPU", "found A B", "others % A/B"], rows))
    lines.append("")
    srows = []
    for case, pairs in results.items():
        s = summarize(pairs, a, b)
        t = TARGETS.get(case) if sides[1].kind == "postfix" and sides[0].kind != "postfix" else None
        rr, cr = s["rate_ratios"], s["cpu_ratios"]
        srows.append([case, len(pairs), fmt(s["a_rate"], 1), fmt(s["b_rate"], 1),
                      f"{s['rate_median']:.2f}x" if rr else "-",
                      f"{min(rr):.2f}-{max(rr):.2f}" if rr else "-",
                      f">= {t[0]:.1f}x {'MET' if rr and s['rate_median'] >= t[0] else 'NOT MET'}"
                      if t else "",
                      fmt(s["a_cpu"], 2), fmt(s["b_cpu"], 2),
                      f"{s['cpu_median']:.2f}x" if cr else "-",
                      f"{min(cr):.2f}-{max(cr):.2f}" if cr else "-",
                      f"<= {t[1]:.1f}x {'MET' if cr and s['cpu_median'] <= t[1] else 'NOT MET'}"
                      if t else ""])
    lines.append(table(["case", "pairs", "A msg/s (median)", "B msg/s", "A/B median", "range",
                        "target", "A CPU ms/msg", "B CPU ms/msg", "A/B CPU median", "range",
                        "target"], srows))
    lost = [f"{p[k]['case']} {k}: {p[k]['found']}/{p[k]['sent']} rc {p[k]['rc']} "
            f"{p[k]['stderr'][:120]}" for pairs in results.values() for p in pairs for k in (a, b)
            if p[k]["found"] < p[k]["sent"] or p[k]["rc"] != 0 or p[k]["duplicates"]]
    if lost:
        lines += ["", "WARNING: runs with messages missing, duplicated, or smtp-source errors:"]
        lines += [f"  {x}" for x in lost]
    for i, c in enumerate(ceil, 1):
        lines.append("")
        f = c["fsync"]
        lines.append(f"ceilings ({i}): fsync {f['fsyncs_per_s']:,.0f}/s ({f['ms_per_fsync']:.2f} "
                     "ms each, one thread, 2 KiB appends)")
        if "error" in c:
            lines.append(f"  {c['error']}")
            continue
        lines.append(
            f"  floor_files (queue+Maildir file work in C, no SMTP), 2 KiB: 1 thread "
            f"{c['floor_1']['rate']:,.0f} msg/s, 20 threads {c['floor_20']['rate']:,.0f} msg/s "
            f"({c['floor_20']['cpu_ms']:.2f} ms CPU/msg); 100 KiB, 20 threads "
            f"{c['floor_20_100k']['rate']:,.0f} msg/s ({c['floor_20_100k']['cpu_ms']:.2f} ms)")
        lines.append(
            f"  smtp-sink {c['sink']['rate']:,.0f} msg/s ({c['sink']['cpu_ms']:.2f} ms server + "
            f"{c['sink']['client_ms']:.2f} ms smtp-source per message); any implementation on "
            f"{os.cpu_count()} cores at 20 x 2 KiB: {c['any_impl_2k']:,.0f} msg/s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--cases", default="1x2k,20x2k,20x100k",
                    help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--scale", type=float, default=1.0, help="times the messages per run")
    ap.add_argument("--side", action="append",
                    help="ours[@COMMIT][*K][+TOML], plain[@COMMIT][*K][+TOML] or "
                    "postfix[:K=V,...]; twice (default: ours, postfix)")
    ap.add_argument("--source", help="our code for ours/plain sides without @COMMIT")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="seconds to wait at most for a quiet machine before each pair")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    specs = args.side or ["ours", "postfix"]
    if len(specs) != 2 or specs[0] == specs[1]:
        ap.error("give --side twice, two different sides")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c}")
    scratch = Path(tempfile.mkdtemp(prefix="pf-bench-", dir=args.scratch))
    scratch.chmod(0o755)        # Postfix's daemons (user postfix) must reach their folders
    sides = [Side(s, scratch, args.source) for s in specs]
    results: dict[str, list] = {}
    ceil: list[dict] = []
    try:
        if not args.no_ceiling:
            wait_quiet(args.quiet_wait)
            ceil.append(ceilings(scratch, args.scale))
            print(f"ceilings: {ceil[-1]}", flush=True)
        for case in cases:
            pairs = results.setdefault(case, [])
            for k in range(args.pairs):
                wait_quiet(args.quiet_wait)
                order = sides if k % 2 == 0 else sides[::-1]
                pair = {"first": "A" if order[0] is sides[0] else "B"}
                for side in order:
                    try:
                        r = one_run(side, case, scratch / "run", args.scale)
                    except ServerUnavailable as e:
                        print(f"{side.spec}: unavailable: {e}", flush=True)
                        return 1
                    pair[side.spec] = r
                    print(f"{case} pair {k + 1} {side.spec}: {fmt(r['rate'], 1)} msg/s, "
                          f"{r['cpu_ms']:.2f} ms CPU/msg, found {r['found']}/{r['sent']}, "
                          f"others {r['others_pct']:.0f}%", flush=True)
                pairs.append(pair)
        if not args.no_ceiling:
            wait_quiet(args.quiet_wait)
            ceil.append(ceilings(scratch, args.scale))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    text = report(results, ceil, args, sides)
    print("\n" + text)
    out = write_results("postfix", text, {"machine": machine_info(), "args": vars(args),
                                          "results": results, "ceilings": ceil})
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
