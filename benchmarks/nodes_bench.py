"""Issue 23 end to end: messages/s with the PostgreSQL directory against SQLite, and two nodes
against one, in the same run (alternating order), every message verified in the Maildir.

    /work/venv/bin/python benchmarks/nodes_bench.py [--rounds 3] [--messages 3000]
        [--sessions 20] [--size 2048] [--quiet-wait 60] [--no-syscalls] [--source HEAD]

Sides (each run starts fresh: new scratch folder on the real disk, new database):
- ``sqlite``: one node, `[users] database = ""` (the embedded store), `mailboxes` a tree of
  its own;
- ``pg``: one node, `[users] database` = a private PostgreSQL cluster (mailappliance.testing.
  postgres, fsync on as in production, TCP on 127.0.0.1);
- ``pg2``: two nodes (two `twistd -n mailappliance` processes, hostnames node-a/node-b, each
  its own data directory and queue) on 127.0.0.1, kernel-chosen ports, sharing the database
  and the mailbox tree; the load is split: one smtp-source per node with half the sessions
  and half the messages, started together.

Load: postfix's smtp-source, a new connection per message, no pipelining:
``smtp-source -4 -M localhost -s SESSIONS -m MESSAGES -l SIZE -f a@test.com -t test@test.com``.
Rate: messages / (last arrival in Maildir/new - start of smtp-source), arrivals timestamped by
an inotify watcher process (benchmarks/common.py MaildirWatcher). Verification: every
Message-Id must be in the Maildir once (new/ or cur/); for pg2 the file names say which node
delivered (Maildir unique names end in the hostname) and no name may occur twice.

Also measured per run: CPU of the servers (ms per message), of the PostgreSQL cluster (all its
processes), the database's statements per message (pg_stat_statements: lookups, grant checks,
the watchers' probes), and "others": the rest of the shared machine (whole-machine busy time
minus servers, PostgreSQL, smtp-source and this harness), % of one core.

Unless --no-syscalls, one extra short run of the ``pg`` side under `strace -f -y` counts the
file-system calls per message that touch the shared mailbox tree (what NFS would carry) and the
node's own queue: creates, fsyncs of files and directories, renames/links, unlinks; and before
and after the rounds, the disk's fsyncs per second (one thread, 2 KiB appends), the bound of
any strictly sequential durable write here.

Results: benchmarks/results/<time>-nodes.{txt,json}. On this 2-core machine two nodes share
the same two cores (and the disk) that one node already keeps busy: pg2 against pg measures
correctness under contention and the cost of the split, not scaling (docs/SEVERAL_NODES.md
reasons about a real 4-node site from these figures).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (DEFAULT_SCRATCH, HOST, RCPT, SENDER,  # noqa: E402
                               SMTP_SOURCE, HeaderCache, MaildirWatcher, ServerUnavailable,
                               check_smtp, cpu_seconds, fmt, machine_info, maildir_files,
                               prepare_source, process_tree, system_busy_seconds, table,
                               wait_quiet, write_results)
from benchmarks.common import count_new, wait_delivered  # noqa: E402

SIDES = ("sqlite", "pg", "pg2")
DOMAIN = "test.com"
PW = "Bench-pass-1!"
WARM_UP_ID = b"<warm-up@bench.test>"
# Our server's limits raised for the benchmark (the defaults, 40 connections and 10 per IP,
# would refuse 20 sessions from 127.0.0.1), as benchmarks/common.py OurServer does.
MAX_CONNECTIONS = 1200
# Polling interval of the warm-up wait below.
POLL = 0.02
# The warm-up message (one per node) reaches the Maildir in milliseconds; bound the wait.
WARM_UP_TIMEOUT = 30.0
# smtp-source's own bound: generous (a run takes seconds), so a hung server cannot hang us.
SOURCE_TIMEOUT_PER_MESSAGE = 0.5
SOURCE_TIMEOUT_MIN = 120.0
# The strace run: messages (strace slows every system call; a few hundred show the pattern).
SYSCALL_MESSAGES = 300
# Uncached directory lookups timed for PostgreSQL's CPU per lookup (about a second).
LOOKUP_COST_CALLS = 5000
STRACE_CALLS = ("openat", "fsync", "fdatasync", "rename", "renameat", "renameat2", "link",
                "linkat", "unlink", "unlinkat", "mkdir", "mkdirat")


def config_text(mail: Path, database: str) -> str:
    return (f'default_domain = "{DOMAIN}"\n'
            f'mailboxes = "{mail}"\n'
            "[smtp]\n"
            f"max_connections = {MAX_CONNECTIONS}\n"
            f"max_per_ip = {MAX_CONNECTIONS}\n"
            "[users]\n"
            f'database = "{database}"\n')


class Site:
    """One side's servers: 1 node (sqlite, pg) or 2 nodes (pg2) in `root`."""

    def __init__(self, side: str, root: Path, cluster, env: dict | None) -> None:
        from tests.integration.server import ServerProcess
        self.side = side
        self.root = root
        self.cluster = cluster
        self.mail = root / "mail"
        self.dbname = None
        database = ""
        if side != "sqlite":
            self.dbname = cluster.create_database()
            database = cluster.uri(self.dbname)
        text = config_text(self.mail, database)
        names = ("node-a", "node-b") if side == "pg2" else ("node-a",)
        self.nodes = [ServerProcess(root / n, text, hostname=f"{n}.bench.test", env=env)
                      for n in names]
        self.maildir = self.mail / DOMAIN / "test" / "Maildir"
        self.ports: list[int] = []

    def start(self) -> "Site":
        self.mail.mkdir(parents=True)
        try:
            first = self.nodes[0]
            for n in self.nodes:
                n.root.mkdir(parents=True)
                n._write_config()
            first.cli("domain", "add", DOMAIN)
            first.cli("user", "add", RCPT, "--password-stdin", input=PW + "\n")
            for n in self.nodes:
                n.start()
                self.ports.append(int(n.ports["smtp"][0]))
            for port in self.ports:
                check_smtp(port)
            # The warm-up messages in the Maildir before anything is measured.
            deadline = time.monotonic() + WARM_UP_TIMEOUT
            while len(maildir_files(self.maildir)) < len(self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("warm-up messages not delivered")
                time.sleep(POLL)
        except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError,
                KeyError) as e:
            self.stop()
            raise ServerUnavailable(f"{self.side}: did not start: {e}") from e
        return self

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        if self.dbname:
            self.cluster.drop_database(self.dbname)
            self.dbname = None

    @property
    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.proc is not None]

    def pending(self) -> int:
        total = 0
        for n in self.nodes:
            try:
                total += sum(1 for e in os.scandir(n.data / "queue" / "mess")
                             if e.name.isdigit())
            except FileNotFoundError:
                pass
        return total


# --- PostgreSQL's side: its CPU and its statements -------------------------------------------

def postmaster_pid(cluster) -> int:
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


def cpu_by_pid(pids) -> dict[int, float]:
    return {p: cpu_seconds([p]) for p in pids}


def pg_cpu(cluster, before: dict[int, float]) -> float:
    """CPU seconds of the cluster's processes since `before` (new ones counted whole; reaped
    ones are in the postmaster's cutime/cstime)."""
    now = cpu_by_pid(process_tree(postmaster_pid(cluster)))
    return sum(v - before.get(p, 0.0) for p, v in now.items())


def statements_reset(cluster, dbname: str) -> None:
    with cluster.admin(dbname) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")


def statements(cluster, dbname: str) -> dict[str, int]:
    """Calls per normalized statement in `dbname` since the reset (superuser's own left out)."""
    with cluster.admin(dbname) as conn:
        rows = conn.execute(
            "SELECT s.query, sum(s.calls) FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid "
            "WHERE d.datname = %s AND r.rolname <> 'postgres' GROUP BY s.query",
            (dbname,)).fetchall()
    return {" ".join(q.split())[:90]: int(n) for q, n in rows}


# --- one run ------------------------------------------------------------------------------------

def smtp_sources(ports: list[int], sessions: int, messages: int, size: int) -> dict:
    """One smtp-source per port, started together, sessions and messages split evenly."""
    k = len(ports)
    procs = []
    r0 = os.times()
    t0 = time.monotonic()
    for i, port in enumerate(ports):
        s = sessions // k + (1 if i < sessions % k else 0)
        m = messages // k + (1 if i < messages % k else 0)
        cmd = [SMTP_SOURCE, "-4", "-M", "localhost", "-s", str(s), "-m", str(m), "-l",
               str(size), "-f", SENDER, "-t", RCPT, f"{HOST}:{port}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    timeout = max(SOURCE_TIMEOUT_MIN, messages * SOURCE_TIMEOUT_PER_MESSAGE)
    rcs, errs = [], []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, t0 + timeout - time.monotonic()))
            rcs.append(p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            rcs.append(-1)
            err = f"timed out after {timeout:.0f}s; {err}"
        errs.append(err.strip()[-300:])
    r1 = os.times()
    return {"t0": t0, "wall": time.monotonic() - t0, "rc": max(rcs, key=abs),
            "stderr": " | ".join(e for e in errs if e),
            "client_cpu": (r1.children_user - r0.children_user)
            + (r1.children_system - r0.children_system)}


NODE_OF_NAME = re.compile(r"\.(node-[ab])\.bench\.test")


def one_run(side: str, root: Path, cluster, args, env) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    site = Site(side, root, cluster, env).start()
    try:
        if site.dbname:
            statements_reset(cluster, site.dbname)
        before = count_new(site.maildir)
        watcher = MaildirWatcher(site.maildir / "new", root / "arrivals.txt")
        watcher.start()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        pg0 = cpu_by_pid(process_tree(postmaster_pid(cluster)))
        srv0 = cpu_seconds(site.pids)
        sys0 = system_busy_seconds()
        try:
            res = smtp_sources(site.ports, args.sessions, args.messages, args.size)
            wait_delivered(site.maildir, before, args.messages)
        finally:
            arrivals, overflow = watcher.stop()
        wall = time.monotonic() - res["t0"]
        busy = system_busy_seconds() - sys0
        srv_cpu = cpu_seconds(site.pids) - srv0
        db_cpu = pg_cpu(cluster, pg0)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        stmts = statements(cluster, site.dbname) if site.dbname else {}
        files = maildir_files(site.maildir)
        ids = HeaderCache("message-id").ids(files)
        ids.pop(WARM_UP_ID, None)
        names = [p.name for p in files]
        by_node = collections.Counter(
            (NODE_OF_NAME.search(n).group(1) if NODE_OF_NAME.search(n) else "?") for n in names)
        left = site.pending()
    finally:
        site.stop()
    t0 = res["t0"]
    times = sorted(t for t in arrivals.values() if t >= t0)
    found = len(ids)
    got = min(len(times), found)
    harness = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    others = 100.0 * (busy - srv_cpu - db_cpu - res["client_cpu"] - harness) / wall
    n_stmt = sum(stmts.values())
    out = {
        "side": side, "sent": args.messages, "rc": res["rc"], "stderr": res["stderr"],
        "found": found, "duplicates": sum(n - 1 for n in ids.values() if n > 1),
        "duplicate_names": len(names) - len(set(names)), "by_node": dict(by_node),
        "left_in_queue": left, "inotify_overflows": overflow,
        "rate": got / (times[got - 1] - t0) if got else None,
        "accept_rate": args.messages / res["wall"] if res["rc"] == 0 else None,
        "server_ms": 1000.0 * srv_cpu / max(found, 1),
        "db_us": 1e6 * db_cpu / max(found, 1),
        "server_cpu_pct": 100.0 * srv_cpu / wall, "db_cpu_pct": 100.0 * db_cpu / wall,
        "others_pct": max(0.0, others), "wall": wall,
        "statements": stmts, "statements_per_msg": n_stmt / max(found, 1),
    }
    if found < args.messages or overflow:
        out["rate"] = found / wall if out["rate"] is None else out["rate"] * found / args.messages
    return out


# --- what touches the shared tree: strace ---------------------------------------------------

SYSCALL_LINE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)")
PATH_IN = re.compile(r'[<"]([^<>"]+)[>"]')


def syscall_run(root: Path, cluster, env) -> dict:
    """One `pg` node under strace -f -y while SYSCALL_MESSAGES messages go through: calls per
    message that touch the shared mailbox tree and the node's own data directory."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    site = Site("pg", root, cluster, env).start()
    out_prefix = root / "strace"
    try:
        # -ff: one file per thread, so no call is split into "unfinished" and "resumed".
        tracer = subprocess.Popen(["strace", "-f", "-ff", "-y", "-qq", "-o", str(out_prefix),
                                   "-e",
                                   "trace=" + ",".join(STRACE_CALLS), "-p",
                                   str(site.pids[0])], stderr=subprocess.PIPE)
        time.sleep(1.0)      # strace attaches to every thread before the load starts
        before = count_new(site.maildir)
        smtp_sources(site.ports, 20, SYSCALL_MESSAGES, 2048)
        wait_delivered(site.maildir, before, SYSCALL_MESSAGES)
        tracer.terminate()
        tracer.wait(30)
    finally:
        site.stop()
    mail, data = str(site.mail), str(site.nodes[0].data)
    counts: collections.Counter = collections.Counter()
    lines = [line for f in sorted(root.glob("strace.*"))
             for line in f.read_text(errors="replace").splitlines()]
    for line in lines:
        m = SYSCALL_LINE.match(line)
        if not m or int(m.group(3)) < 0:
            continue
        call, argtext = m.group(1), m.group(2)
        paths = PATH_IN.findall(argtext)
        where = ("mailboxes" if any(p.startswith(mail) for p in paths) else
                 "queue" if any(p.startswith(data + "/queue") for p in paths) else
                 "log" if any(p.startswith(data + "/log") for p in paths) else None)
        if where is None:
            continue
        if call == "openat":
            if "O_CREAT" not in argtext:
                continue
            call = "create" if "O_DIRECTORY" not in argtext else "open dir"
        elif call in ("fsync", "fdatasync"):
            call = "fsync dir" if paths and os.path.isdir(paths[-1]) else "fsync file"
        elif call.startswith("rename"):
            call = "rename"
        elif call.startswith("link"):
            call = "link"
        elif call.startswith("unlink"):
            call = "unlink"
        elif call.startswith("mkdir"):
            call = "mkdir"
        counts[(where, call)] += 1
    return {"messages": SYSCALL_MESSAGES,
            "per_message": {f"{w} {c}": n / SYSCALL_MESSAGES for (w, c), n in
                            sorted(counts.items())}}


# --- what one directory miss costs PostgreSQL -------------------------------------------------

def lookup_cost(cluster, root: Path, lookups: int = LOOKUP_COST_CALLS) -> dict:
    """CPU of the cluster's processes per uncached `lookup_recipient` (one primary-key query,
    as RCPT asks after a change emptied the cache), one call at a time from one thread."""
    from mailappliance.users.pgstore import PgUserStore
    dbname = cluster.create_database()
    store = PgUserStore(cluster.uri(dbname), root / "lookup-mail", 4)
    try:
        store.add_domain(DOMAIN)
        for i in range(100):
            store.add_user(f"user{i}@{DOMAIN}", PW)
        store.sync()
        # a fresh upper/lower-case spelling each time: a new cache key for the same row
        rng = random.Random(23)
        names, seen = [], set()
        while len(names) < lookups:
            a = "".join(c.upper() if rng.random() < 0.5 else c
                        for c in f"user{rng.randrange(100)}@{DOMAIN}")
            if a not in seen:
                seen.add(a)
                names.append(a)
        before = cpu_by_pid(process_tree(postmaster_pid(cluster)))
        t0 = time.monotonic()
        for name in names:
            store.lookup_recipient(name)
        wall = time.monotonic() - t0
        cpu = pg_cpu(cluster, before)
    finally:
        store.close()
        cluster.drop_database(dbname)
    return {"lookups": lookups, "pg_us": 1e6 * cpu / lookups, "wall_us": 1e6 * wall / lookups}


# --- report -------------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(rounds: list[dict], sysc: dict | None, args,
           fsyncs: list[tuple[str, dict]] = (), lookup: dict | None = None) -> str:
    lines = [f"nodes_bench: smtp-source, {args.sessions} sessions, {args.size} B, "
             f"{args.messages} messages per run, a new connection per message, every message "
             "verified in the Maildir; rate = end to end (last arrival in new/)",
             f"command: {' '.join(sys.argv)}", f"machine: {machine_info()}", ""]
    rows = []
    for i, r in enumerate(rounds, 1):
        for side in r["order"]:
            x = r[side]
            rows.append([i, side, fmt(x["rate"], 1), f"{x['found']}/{x['sent']}",
                         x["duplicates"] + x["duplicate_names"],
                         " ".join(f"{k}:{v}" for k, v in sorted(x["by_node"].items())),
                         fmt(x["server_ms"], 2), fmt(x["db_us"], 1),
                         fmt(x["statements_per_msg"], 3) if x["side"] != "sqlite" else "-",
                         f"{x['server_cpu_pct']:.0f}", f"{x['db_cpu_pct']:.0f}",
                         f"{x['others_pct']:.0f}"])
    lines.append(table(["round", "side", "msg/s", "found", "dup", "delivered by",
                        "server CPU ms/msg", "PG CPU us/msg", "DB stmts/msg", "server CPU%",
                        "PG CPU%", "others CPU%"], rows))
    lines.append("")

    def ratios(a, b, key):
        return [r[a][key] / r[b][key] for r in rounds if r[a][key] and r[b][key]]
    srows = []
    for a, b, what in (("pg", "sqlite", "PostgreSQL / SQLite, one node"),
                       ("pg2", "pg", "two nodes / one node, PostgreSQL")) if rounds else ():
        rr, cr = ratios(a, b, "rate"), ratios(a, b, "server_ms")
        srows.append([what, len(rr), fmt(med([r[a]["rate"] for r in rounds]), 1),
                      fmt(med([r[b]["rate"] for r in rounds]), 1),
                      f"{statistics.median(rr):.2f}x" if rr else "-",
                      f"{min(rr):.2f}-{max(rr):.2f}" if rr else "-",
                      f"{statistics.median(cr):.2f}x" if cr else "-",
                      f"{min(cr):.2f}-{max(cr):.2f}" if cr else "-",
                      f"{max(r[a]['others_pct'] for r in rounds):.0f}/"
                      f"{max(r[b]['others_pct'] for r in rounds):.0f}"])
    lines.append(table(["comparison", "rounds", "A msg/s (median)", "B msg/s (median)",
                        "A/B msg/s median", "range", "A/B server CPU per msg median", "range",
                        "others CPU% max A/B"], srows))
    stmts: collections.Counter = collections.Counter()
    sent = 0
    for r in rounds:
        for side in ("pg", "pg2"):
            stmts.update(r[side]["statements"])
            sent += r[side]["found"]
    if stmts:
        lines += ["", "database statements per delivered message (pg and pg2 runs, all nodes):"]
        for q, n in stmts.most_common(8):
            lines.append(f"  {n / max(sent, 1):8.4f}  {q}")
    bad = [f"round {i} {s}: found {r[s]['found']}/{r[s]['sent']}, dup {r[s]['duplicates']}, "
           f"dup names {r[s]['duplicate_names']}, rc {r[s]['rc']} {r[s]['stderr'][:120]}"
           for i, r in enumerate(rounds, 1) for s in SIDES
           if r[s]["found"] < r[s]["sent"] or r[s]["duplicates"] or r[s]["duplicate_names"]
           or r[s]["rc"] != 0]
    if bad:
        lines += ["", "WARNING: runs with messages missing, duplicated or smtp-source errors:"]
        lines += [f"  {b}" for b in bad]
    if lookup:
        lines.append(f"one uncached lookup_recipient (a primary-key query; {lookup['lookups']} "
                     f"one at a time): PostgreSQL CPU {lookup['pg_us']:.1f} us, wall "
                     f"{lookup['wall_us']:.0f} us")
    for when, f in fsyncs:
        lines.append(f"disk ({when}): {f['fsyncs_per_s']:,.0f} fsyncs/s ({f['ms_per_fsync']:.2f} "
                     "ms each; one thread appending 2 KiB and fsyncing, on the scratch disk)")
    if sysc:
        lines += ["", f"file-system calls per message, one pg node under strace -f -y "
                  f"({sysc['messages']} messages, 20 sessions):"]
        lines += [f"  {v:6.2f}  {k}" for k, v in sysc["per_message"].items()]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="seconds to wait at most for a quiet machine before each round")
    ap.add_argument("--no-syscalls", action="store_true")
    ap.add_argument("--source", help="run our server from this commit or directory")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not os.access(SMTP_SOURCE, os.X_OK):
        print(f"{SMTP_SOURCE} missing (Debian package postfix)", file=sys.stderr)
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="nodes-bench-", dir=args.scratch))
    label = prepare_source(args.source, scratch / "src") if args.source else None
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    from mailappliance.testing.postgres import PostgresCluster
    cluster = PostgresCluster(fsync=True)
    cluster.init()
    with open(cluster.data / "postgresql.conf", "a") as f:
        f.write("shared_preload_libraries = 'pg_stat_statements'\n"
                "pg_stat_statements.track = top\n")
    rounds: list[dict] = []
    sysc = None
    fsyncs: list[tuple[str, dict]] = []
    lookup = None
    from benchmarks.postfix_bench import fsync_ceiling
    try:
        cluster.start()
        fsyncs.append(("before", fsync_ceiling(scratch)))
        for k in range(args.rounds):
            busy = wait_quiet(args.quiet_wait)
            order = list(SIDES[k % 3:] + SIDES[:k % 3])
            r = {"order": order, "quiet_busy_pct": busy}
            for side in order:
                try:
                    r[side] = one_run(side, scratch / "run", cluster, args, env)
                except ServerUnavailable as e:
                    print(f"{side}: unavailable: {e}", flush=True)
                    return 1
                x = r[side]
                print(f"round {k + 1} {side}: {fmt(x['rate'], 1)} msg/s, found "
                      f"{x['found']}/{x['sent']}, by {x['by_node']}, server "
                      f"{x['server_ms']:.2f} ms/msg, PG {x['db_us']:.1f} us/msg, "
                      f"{x['statements_per_msg']:.3f} stmts/msg, others "
                      f"{x['others_pct']:.0f}%", flush=True)
            rounds.append(r)
        fsyncs.append(("after", fsync_ceiling(scratch)))
        lookup = lookup_cost(cluster, scratch)
        if not args.no_syscalls and shutil.which("strace"):
            sysc = syscall_run(scratch / "strace", cluster, env)
    finally:
        cluster.destroy()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    text = report(rounds, sysc, args, fsyncs, lookup)
    if label:
        text = text.replace("\n", f"\ncode: {label}\n", 1)
    print("\n" + text)
    out = write_results("nodes", text, {"machine": machine_info(), "args": vars(args),
                                        "rounds": rounds, "syscalls": sysc,
                                        "fsyncs": fsyncs, "lookup_cost": lookup})
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
