"""What issue 3's 2x target asks of this machine: the target next to the ceilings, same run.

    python benchmarks/ceiling_bench.py [--rounds 2] [--messages 4000]
        [--sessions 20] [--size 2048] [--no-two] [--no-postfix] [--scratch /var/tmp]
        [--quiet-wait 60]

Each round measures, one after the other (the order rotates from round to round, because this
shared machine's speed drifts by up to 2x within minutes):

- **aiosmtpd** (benchmarks/peers/aiosmtpd_maildir.py) and **mailappliance**, each fed by
  postfix's smtp-source (20 sessions, 2 KiB, a new connection per message, as smtp_bench.py):
  msg/s, the server's CPU per message, smtp-source's CPU per message and, for us, the CPU per
  message of the reactor thread alone (/proc/PID/task/PID/stat: twistd's main thread);
- **mailappliance x2**: two independent instances of our server at once, each fed by its own
  smtp-source with half the sessions and half the messages: the most a design of two
  processes could gain here (they share nothing, not even the queue; --no-two leaves it out);
- **Postfix** (a private instance, benchmarks/peers/postfix.py, delivering into a virtual
  Maildir as in e2e_bench.py) fed the same way: what a mature C MTA doing the same queue-then-
  Maildir work reaches here (its CPU per message is over its whole process tree);
- **smtp-sink** (Postfix's C SMTP server that stores nothing) fed by smtp-source the same way:
  the CPU per message that the SMTP conversation itself costs, client and server, in C;
- **floor_files** (benchmarks/peers/floor_files.c, compiled here with gcc): the file work
  issues 3 and 4 require per message (queue file written and fsynced before the 250, then the
  Maildir copy and the queue file's removal), in C, 20 threads, no SMTP at all: its rate and
  its CPU per message.

From these the table derives, per round:
- the target, 2x aiosmtpd's msg/s;
- a ceiling for any implementation on this machine's 2 cores:
  2 cores / (floor_files + smtp-sink + smtp-source CPU per message), assuming both cores busy
  all the time with nothing wasted;
- our reactor thread's ceiling: 1 / (its CPU per message), the rate at which that one thread
  would be busy all the time (before any waiting for the GIL);
- our two-core ceiling: 2 / (our process + smtp-source CPU per message).

Everything listens on 127.0.0.1 only; each server is started fresh in a scratch folder on the
real disk and stopped by PID. Results are printed and written to
benchmarks/results/<time>-ceiling.{txt,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (BENCH_DIR, DEFAULT_SCRATCH, HOST,  # noqa: E402
                               AiosmtpdPeer, HeaderCache, OurServer, PostfixPeer,
                               ServerUnavailable,
                               check_smtp, cpu_seconds, fmt, free_port, machine_info,
                               run_smtp_source, system_busy_seconds, table, thread_cpu_seconds,
                               wait_quiet, write_results)
from benchmarks.smtp_bench import one_run  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
FLOOR_SOURCE = BENCH_DIR / "peers" / "floor_files.c"
# The queue file holds the envelope and our Received: header besides smtp-source's message.
QUEUE_OVERHEAD = 300
SINK_START_TIMEOUT = 10.0
TARGET_RATIO = 2.0
RUNS = ("aiosmtpd", "mailappliance", "mailappliance x2", "postfix", "smtp-sink", "floor_files")
CORES = os.cpu_count() or 2


def build_floor(scratch: Path) -> Path:
    exe = scratch / "floor_files"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(FLOOR_SOURCE)], check=True,
                   capture_output=True, timeout=120)
    return exe


def run_floor(exe: Path, scratch: Path, threads: int, messages: int, size: int) -> dict:
    work = scratch / "floor"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    b0, t0 = system_busy_seconds(), time.monotonic()
    out = subprocess.run([str(exe), str(work), str(threads), str(messages),
                          str(size + QUEUE_OVERHEAD)], check=True, capture_output=True,
                         text=True, timeout=max(60.0, messages * 0.1))
    machine = machine_busy(b0, t0)
    res = json.loads(out.stdout)
    delivered = len(os.listdir(work / "Maildir" / "new"))
    left = len(os.listdir(work / "queue" / "mess"))
    shutil.rmtree(work, ignore_errors=True)
    if delivered != messages or left:
        raise RuntimeError(f"floor_files delivered {delivered}/{messages}, {left} left queued")
    return {"kind": "floor_files", "rate": messages / res["wall"],
            "cpu_ms": 1000.0 * (res["user"] + res["sys"]) / messages, "machine_pct": machine,
            **res}


def run_sink(sessions: int, messages: int, size: int) -> dict:
    port = free_port()
    cmd = [SMTP_SINK, "-4"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    proc = subprocess.Popen(cmd + [f"{HOST}:{port}", "256"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + SINK_START_TIMEOUT
        while True:
            try:
                check_smtp(port, timeout=1.0)
                break
            except (ServerUnavailable, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerUnavailable("smtp-sink did not start: "
                                            f"{proc.stderr.read().decode()[-300:]}")
                time.sleep(0.05)
        cpu0, b0, t0 = cpu_seconds([proc.pid]), system_busy_seconds(), time.monotonic()
        res = run_smtp_source(port, sessions, messages, size, max(60.0, messages * 0.1))
        cpu, machine = cpu_seconds([proc.pid]) - cpu0, machine_busy(b0, t0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if res["rc"] != 0:
        raise RuntimeError(f"smtp-source against smtp-sink failed: {res['stderr']}")
    return {"kind": "smtp-sink", "rate": messages / res["wall"],
            "cpu_ms": 1000.0 * cpu / messages,
            "client_ms": 1000.0 * res["client_cpu"] / messages, "machine_pct": machine}


def run_server(server, ids: HeaderCache, sessions: int, messages: int, size: int) -> dict:
    # The main thread: twistd's reactor, aiosmtpd's event loop (Postfix: a process tree).
    single = not isinstance(server, PostfixPeer)
    t0 = thread_cpu_seconds(server.pid, server.pid) if single else 0.0
    r = one_run(server, sessions, size, messages, ids)
    reactor = thread_cpu_seconds(server.pid, server.pid) - t0 if single else None
    if r["rc"] != 0 or r["found"] != messages:
        raise RuntimeError(f"{server.name}: rc={r['rc']}, found {r['found']}/{messages} "
                           f"{r['stderr'][:200]}")
    return {"kind": server.name, "rate": r["rate"],
            "cpu_ms": 1000.0 * r["server_cpu"] / messages,
            "client_ms": 1000.0 * r["client_cpu"] / messages,
            "main_thread_ms": 1000.0 * reactor / messages if single else None,
            "others_cpu_pct": r["others_cpu_pct"], "machine_pct": r["machine_busy_pct"]}


def run_two(servers: list, caches: list, sessions: int, messages: int, size: int) -> dict:
    """Two independent instances of our server at once, each fed by its own smtp-source with
    half the sessions and half the messages: what a design of two processes could do at most
    (they share nothing, not even a queue). Rate = all messages / the longer wall time."""
    out: list = [None, None]

    def one(k: int) -> None:
        try:
            out[k] = one_run(servers[k], sessions // 2, size, messages // 2, caches[k])
        except Exception as e:  # noqa: BLE001 - reported below, in the calling thread
            out[k] = e

    threads = [threading.Thread(target=one, args=(k,)) for k in (0, 1)]
    b0, t0 = system_busy_seconds(), time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    machine = machine_busy(b0, t0)
    for r in out:
        if isinstance(r, Exception):
            raise r
        if r["rc"] != 0 or r["found"] != messages // 2:
            raise RuntimeError(f"two instances: rc={r['rc']}, found {r['found']}/"
                               f"{messages // 2} {r['stderr'][:200]}")
    # smtp-source's own CPU is not given: os.times() of two concurrent children mixes them up.
    return {"kind": "mailappliance x2", "rate": 2 * (messages // 2) / max(r["wall"] for r in out),
            "cpu_ms": 1000.0 * sum(r["server_cpu"] for r in out) / messages,
            "machine_pct": machine}


def machine_busy(b0: float, t0: float) -> float:
    """How busy the whole machine was since (system_busy_seconds(), time.monotonic()): % of one
    core, all processes."""
    return 100.0 * (system_busy_seconds() - b0) / (time.monotonic() - t0)


def derive(rnd: dict) -> dict:
    aio, ours, sink, floor = (rnd[k] for k in ("aiosmtpd", "mailappliance", "smtp-sink",
                                                "floor_files"))
    any_ms = floor["cpu_ms"] + sink["cpu_ms"] + sink["client_ms"]
    return {
        "target": TARGET_RATIO * aio["rate"],
        "ours": ours["rate"],
        "ratio": ours["rate"] / aio["rate"],
        "any_ceiling": 1000.0 * CORES / any_ms,
        "any_ms": any_ms,
        "floor_rate": floor["rate"],
        "reactor_ceiling": 1000.0 / ours["main_thread_ms"],
        "ours_two_core_ceiling": 1000.0 * CORES / (ours["cpu_ms"] + ours["client_ms"]),
        "postfix": rnd["postfix"]["rate"] if "postfix" in rnd else None,
        "two_processes": rnd["mailappliance x2"]["rate"] if "mailappliance x2" in rnd else None,
    }


def report(rounds: list[dict], args) -> str:
    lines = [f"ceiling_bench: {args.sessions} sessions x {args.size} B, {args.messages} messages "
             f"per run, {len(rounds)} rounds, {CORES} cores", ""]
    rows = []
    for i, rnd in enumerate(rounds, 1):
        for kind in RUNS:
            if kind not in rnd:
                continue
            m = rnd[kind]
            rows.append([i, kind, fmt(m["rate"], 1), fmt(m["cpu_ms"], 3),
                         fmt(m.get("client_ms"), 3), fmt(m.get("main_thread_ms"), 3),
                         f"{m['machine_pct']:.0f}%"])
    lines.append(table(["round", "run", "msg/s", "its CPU ms/msg", "smtp-source ms/msg",
                        "main thread ms/msg", f"machine busy (of {CORES * 100}%)"], rows))
    lines.append("")
    drows = []
    for i, rnd in enumerate(rounds, 1):
        d = rnd["derived"]
        drows.append([i, fmt(d["target"], 0), fmt(d["ours"], 0), f"{d['ratio']:.2f}x",
                      fmt(d["two_processes"], 0), fmt(d["postfix"], 0),
                      fmt(d["floor_rate"], 0), fmt(d["any_ceiling"], 0),
                      fmt(d["ours_two_core_ceiling"], 0), fmt(d["reactor_ceiling"], 0)])
    lines.append(table(["round", "target (2x aiosmtpd)", "ours", "ours/aiosmtpd",
                        "ours, 2 processes", "postfix",
                        "floor_files alone", "any impl. on 2 cores", "ours on 2 cores",
                        "our reactor thread"], drows))
    med = {k: statistics.median(r["derived"][k] for r in rounds)
           for k, v in rounds[0]["derived"].items() if v is not None}
    lines += ["", "medians: " + ", ".join(f"{k} {v:,.2f}" for k, v in med.items())]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of all the runs (the order rotates from round to round)")
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="seconds to wait at most for a quiet machine before each run")
    ap.add_argument("--no-postfix", action="store_true",
                    help="leave out the private Postfix instance (benchmarks/peers/postfix.py)")
    ap.add_argument("--no-two", action="store_true",
                    help="leave out the run of two instances of our server at once")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()
    for tool in ("/usr/sbin/smtp-source", SMTP_SINK):
        if not os.access(tool, os.X_OK):
            print(f"{tool} missing (Debian package postfix)", file=sys.stderr)
            return 2
    scratch = Path(tempfile.mkdtemp(prefix="ma-ceiling-", dir=args.scratch))
    scratch.chmod(0o755)   # Postfix's daemons (user postfix) must reach their directories
    servers = {}
    try:
        exe = build_floor(scratch)
        servers = {"aiosmtpd": AiosmtpdPeer(scratch / "aiosmtpd").start(),
                   "mailappliance": OurServer(scratch / "mailappliance").start()}
        if not args.no_two:
            servers["mailappliance x2"] = OurServer(scratch / "mailappliance-2").start()
        if not args.no_postfix:
            servers["postfix"] = PostfixPeer(scratch / "postfix").start()
        caches = {k: HeaderCache("message-id") for k in servers}
        runs = {
            "aiosmtpd": lambda: run_server(servers["aiosmtpd"], caches["aiosmtpd"],
                                           args.sessions, args.messages, args.size),
            "mailappliance": lambda: run_server(servers["mailappliance"],
                                                caches["mailappliance"], args.sessions,
                                                args.messages, args.size),
            "mailappliance x2": lambda: run_two(
                [servers["mailappliance"], servers["mailappliance x2"]],
                [caches["mailappliance"], caches["mailappliance x2"]], args.sessions,
                args.messages, args.size),
            "postfix": lambda: run_server(servers["postfix"], caches["postfix"], args.sessions,
                                          args.messages, args.size),
            "smtp-sink": lambda: run_sink(args.sessions, args.messages, args.size),
            "floor_files": lambda: run_floor(exe, scratch, args.sessions, args.messages,
                                             args.size),
        }
        order = [k for k in RUNS if k in servers or k in ("smtp-sink", "floor_files")]
        rounds = []
        for i in range(args.rounds):
            rnd = {}
            for kind in order[i % len(order):] + order[:i % len(order)]:
                wait_quiet(args.quiet_wait)
                rnd[kind] = runs[kind]()
                m = rnd[kind]
                print(f"round {i + 1} {kind}: {m['rate']:.1f} msg/s, {m['cpu_ms']:.3f} ms CPU/msg"
                      + (f", main thread {m['main_thread_ms']:.3f}" if m.get("main_thread_ms")
                         else ""), flush=True)
            rnd["derived"] = derive(rnd)
            rounds.append(rnd)
        text = report(rounds, args)
        print("\n" + text)
        path = write_results("ceiling", text, {"args": vars(args) | {"scratch": str(scratch)},
                                               "machine": machine_info(), "rounds": rounds})
        print(f"\nwritten: {path}")
    finally:
        for srv in servers.values():
            srv.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
