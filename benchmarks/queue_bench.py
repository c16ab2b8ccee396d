"""A large deferred queue: memory, start-up, dead destinations and the drain (issue 19).

    python benchmarks/queue_bench.py [--messages 100000 1000000] [--base REV] [--new REV]
        [--dead-messages 2000] [--drain-seconds 60] [--quiet-wait 30] [--keep] [--cold]

For each size N and each side (the base: a `git archive` of the code before the queue's
active window; new: the working tree or --new), in the same run, one after the other:

1. A queue of N deferred messages is written straight into queue/mess with the store's own
   code (QueueStore.begin, TmpMessage.finish, the envelope codec), without an fsync each (the
   files are settled by one sync before the server starts): one recipient each at
   dead.example, routed to a loopback port nobody listens on, next try (mtime) an hour on.
   The queue is built once and hard-linked for each side (file names are inode numbers, so
   the links keep them right).
2. The real server starts (`twistd -n mailappliance`, SMTP on a fixed loopback port):
   **time until SMTP greets** (a 220 read by a client polling every 20 ms), **time until a
   first message is accepted** (a whole SMTP transaction to a local user, 250 after DATA),
   the **slowest greeting while the queue loads** (connect to 220, each poll), **time until
   the queue is loaded** (ready.json: readiness waits for the load on both sides), **RSS after
   the load** (VmRSS of the server process) and its peak while loading.
3. **Dead destination**: `--dead-messages` more messages, due now, to the same dead
   destination are committed with the store's door and the trigger pulled; the harness waits
   until each has had its first result and counts the server's connection attempts (the
   remote deliverer's "cannot connect" log lines).
4. **Drain**: an smtp-sink (it stores nothing) starts on the dead port, `mailappliance queue
   flush` makes everything due, and the rate at which queue/mess empties is measured over
   `--drain-seconds` (or until empty).

Also reported: the server's CPU seconds while loading, and others' CPU% (whole machine minus
the server) during the load; read figures with others above about 25 % as noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DEFAULT_SCRATCH, ROOT, cpu_seconds, rss_kib,  # noqa: E402
                    system_busy_seconds, table, wait_quiet, write_results)

# The code before the queue got its active window and backlog (the last commit of main before
# "queue: bounded memory ..."): what the base side runs.
BASE_DEFAULT = "b216f68~1"
# The messages' next try: an hour on, so nothing is due while start-up is measured.
NEXT_TRY_AHEAD = 3600
MESSAGE = (b"From: bench@test.com\nTo: someone@dead.example\nSubject: queued %d\n\n"
           + b"This message waits for a destination that is down.\n" * 30)
# Bounds on waiting (the base side loads a million messages in minutes, not hours).
LOAD_TIMEOUT = 3600.0
DEAD_TIMEOUT = 600.0
POLL = 0.02
SINK = "/usr/sbin/smtp-sink"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export(rev: str, scratch: Path) -> Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", rev],
                         capture_output=True, text=True, check=True).stdout.strip()
    path = scratch / f"source-{sha[:12]}"
    if not path.exists():
        path.mkdir(parents=True)
        data = subprocess.run(["git", "-C", str(ROOT), "archive", sha], capture_output=True,
                              check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(path)], input=data, check=True)
    return path


def build_queue(queue_dir: Path, n: int, now: float) -> float:
    """N deferred messages to dead.example, written with the store's code; -> seconds."""
    from mailappliance.fileops import write_all
    from mailappliance.queue.store import QueueStore
    t0 = time.monotonic()
    store = QueueStore(queue_dir)
    next_try = now + NEXT_TRY_AHEAD
    for i in range(n):
        birth = now - 86400 + i * (86400 / n)          # a day's outage, in order
        tmp = store.begin()
        qid = tmp.finish("bench@test.com", [f"u{i}@dead.example"], data=MESSAGE % i,
                         birth=birth, write=False)
        write_all(store.ops, tmp.fd, tmp._tail)
        os.close(tmp.fd)
        path = store.message_path(qid)
        os.rename(tmp.path, path)
        os.utime(path, (next_try, next_try))
    os.sync()
    return time.monotonic() - t0


def count_mess(queue_dir: Path) -> int:
    with os.scandir(queue_dir / "mess") as it:
        return sum(1 for e in it if e.name.isdigit())


def greet(port: int) -> float | None:
    """Seconds from connect to a complete 220 line, or None (not listening yet)."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(30)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(512)
                if not chunk:
                    return None
                data += chunk
            return time.monotonic() - t0 if data.startswith(b"220") else None
    except OSError:
        return None


def one_message(port: int) -> bool:
    """A whole SMTP transaction to the local user, answered 250 after DATA."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            return not c.sendmail("bench@test.com", ["test@test.com"],
                                  b"Subject: during the load\r\n\r\nhello\r\n")
    except (OSError, smtplib.SMTPException):
        return False


class Side:
    def __init__(self, name: str, source: Path, root: Path, dead_port: int,
                 extra_queue: str = "") -> None:
        self.name, self.source, self.root = name, source, root
        self.dead_port = dead_port
        self.smtp_port = free_port()
        self.data = root / "var"
        self.config = root / "mailappliance.toml"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'hostname = "bench.test"\ndata = "{self.data}"\nbcrypt_cost = 4\n'
            'default_domain = "test.com"\n'
            f"[queue]\n{extra_queue}\n"
            "[verify]\nspf = \"off\"\ndkim = \"off\"\ndmarc = \"off\"\n"
            f'[listen]\nsmtp = ["tcp:{self.smtp_port}:interface=127.0.0.1"]\n'
            "submission = []\npop3 = []\n"          # not the defaults' fixed ports
            f'[routes]\n"dead.example" = "127.0.0.1:{dead_port}"\n')
        self.env = dict(os.environ, PYTHONPATH=str(source))
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "mailappliance.cli", "--config",
                               str(self.config), *args], env=self.env, capture_output=True,
                              text=True, timeout=600, check=True).stdout

    def start(self) -> None:
        log = open(self.root / "twistd.out", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
             "sys.argv[0] = 'twistd'; run()", "-n", "--pidfile=", "mailappliance", "-c",
             str(self.config)], cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
            env=self.env)

    def ready(self) -> bool:
        try:
            info = json.loads((self.data / "run" / "ready.json").read_text())
            return info.get("pid") == self.proc.pid
        except (FileNotFoundError, ValueError):
            return False

    def log_tail(self) -> str:
        try:
            with open(self.data / "log" / "current", "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 65536))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        out = []
        log_dir = self.data / "log"
        for name in sorted(n for n in os.listdir(log_dir) if n.startswith("@")) + ["current"]:
            try:
                out.append((log_dir / name).read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "".join(out)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def drop_caches() -> bool:
    """--cold: write back and drop the page cache, dentries and inodes (root only), so the
    server reads the queue from the disk as after a reboot. -> whether it was done."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        print(f"--cold: cannot drop the page cache ({e.strerror}); the run is warm",
              flush=True)
        return False


def run_side(side: Side, master: Path, n: int, args) -> dict:
    r: dict = {"side": side.name, "messages": n}
    side.cli("domain", "add", "test.com")
    subprocess.run([sys.executable, "-m", "mailappliance.cli", "--config", str(side.config),
                    "user", "add", "test@test.com", "--password-stdin"], env=side.env,
                   input="Bench-pass-1!\n", text=True, capture_output=True, check=True)
    t0 = time.monotonic()
    subprocess.run(["cp", "-al", str(master / "queue"), str(side.data / "queue")], check=True)
    r["link_s"] = round(time.monotonic() - t0, 1)
    r["others_before"] = round(wait_quiet(args.quiet_wait), 1)
    if args.cold:
        r["cold"] = drop_caches()
    sys0 = system_busy_seconds()
    t_start = time.monotonic()
    side.start()
    greeted = loaded = served = ready = None
    latencies: list[float] = []         # connect -> 220 while the queue loads
    peak = 0
    deadline = t_start + LOAD_TIMEOUT
    while time.monotonic() < deadline and side.proc.poll() is None:
        lat = greet(side.smtp_port)
        now = time.monotonic()
        if lat is not None:
            if greeted is None:
                greeted = now - t_start
            if loaded is None:
                latencies.append(lat)
        if greeted is not None and served is None and one_message(side.smtp_port):
            served = time.monotonic() - t_start
        if ready is None and side.ready():
            ready = time.monotonic() - t_start
        if loaded is None and ready is not None and (
                side.name == "base" or "queue loaded: " in side.log_tail()):
            # the base logs no end of its load: its readiness fires once every message's
            # read has been handed to the thread pool (RSS shows the reads are then done)
            loaded = time.monotonic() - t_start
        peak = max(peak, rss_kib([side.proc.pid]))
        if greeted is not None and loaded is not None and served is not None:
            break
        time.sleep(POLL)
    if side.proc.poll() is not None:
        raise RuntimeError(f"{side.name}: server exited {side.proc.returncode}: "
                           + (side.root / "twistd.out").read_text()[-2000:])
    wall = time.monotonic() - t_start
    cpu = cpu_seconds([side.proc.pid])
    busy = 100 * (system_busy_seconds() - sys0) / wall
    latencies.sort()
    r.update(served_s=round(served, 2) if served else None,
             greet_p50_ms=round(1000 * latencies[len(latencies) // 2], 1) if latencies
             else None,
             greet_max_ms=round(1000 * latencies[-1], 1) if latencies else None,
             greet_s=round(greeted, 2) if greeted else None,
             ready_s=round(ready, 2) if ready else None,
             loaded_s=round(loaded, 2) if loaded else None,
             rss_loaded_mib=round(rss_kib([side.proc.pid]) / 1024, 1),
             rss_peak_mib=round(peak / 1024, 1), load_cpu_s=round(cpu, 1),
             others_pct=round(max(0.0, busy - 100 * cpu / wall), 1))
    time.sleep(2)
    r["rss_settled_mib"] = round(rss_kib([side.proc.pid]) / 1024, 1)

    # Dead destination: messages due now, one more connection attempt each?
    if args.dead_messages:
        from mailappliance.queue.store import QueueStore
        store = QueueStore(side.data / "queue")
        before = side.log_text().count(f"cannot connect to 127.0.0.1:{side.dead_port}")
        t0 = time.monotonic()
        for i in range(args.dead_messages):
            store.inject(b"Subject: due now %d\n\nhello\n" % i, "bench@test.com",
                         [f"d{i}@dead.example"], trigger=(i % 100 == 99))
        store.pull_trigger()
        pattern = re.compile(r"delivery \d+: deferral: ")
        end = time.monotonic() + DEAD_TIMEOUT
        while time.monotonic() < end:
            if len(pattern.findall(side.log_text())) >= args.dead_messages:
                break
            time.sleep(1)
        text = side.log_text()
        r["dead_deferred"] = len(pattern.findall(text))
        r["dead_attempts"] = text.count(f"cannot connect to 127.0.0.1:{side.dead_port}") \
            - before
        r["dead_s"] = round(time.monotonic() - t0, 1)

    # The destination comes back: drain.
    sink = subprocess.Popen([SINK, *(["-u", "nobody"] if os.geteuid() == 0 else []),
                             f"127.0.0.1:{side.dead_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        start_count = count_mess(side.data / "queue")
        cpu0 = cpu_seconds([side.proc.pid])
        t0 = time.monotonic()
        side.cli("queue", "flush")
        left = start_count
        while time.monotonic() - t0 < args.drain_seconds and left:
            time.sleep(1)
            left = count_mess(side.data / "queue")
        elapsed = time.monotonic() - t0
        r.update(drain_msgs=start_count - left, drain_s=round(elapsed, 1),
                 drain_rate=round((start_count - left) / elapsed, 1),
                 drain_cpu_s=round(cpu_seconds([side.proc.pid]) - cpu0, 1),
                 rss_drain_mib=round(rss_kib([side.proc.pid]) / 1024, 1))
    finally:
        sink.terminate()
        sink.wait(10)
        side.stop()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--base", default=BASE_DEFAULT)
    ap.add_argument("--new", default=None, help="a commit (default: the working tree)")
    ap.add_argument("--sides", default="base,new")
    ap.add_argument("--new-queue", default="", help="extra [queue] lines for the new side")
    ap.add_argument("--dead-messages", type=int, default=2000)
    ap.add_argument("--drain-seconds", type=float, default=60)
    ap.add_argument("--quiet-wait", type=float, default=300)
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before each start (root): a start after a reboot")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="queue-bench-", dir=args.scratch))
    rows, results = [], []
    try:
        sources = {"base": export(args.base, scratch),
                   "new": export(args.new, scratch) if args.new else ROOT}
        for k, n in enumerate(args.messages):
            master = scratch / f"master-{n}"
            dead_port = free_port()
            built = build_queue(master / "queue", n, time.time())
            print(f"built {n} messages in {built:.0f} s", flush=True)
            # The sides take turns at going first (the second finds the files in the page
            # cache more often: they are the same inodes).
            order = args.sides.split(",")
            for name in (order if k % 2 == 0 else order[::-1]):
                # "newNN": the new code with concurrency_destination = NN (the base has no
                # per-destination limit: its drain uses every remote slot on one destination)
                extra = args.new_queue if name.startswith("new") else ""
                if name.startswith("new") and name[3:].isdigit():
                    extra += f"\nconcurrency_destination = {int(name[3:])}"
                side = Side(name, sources["base" if name == "base" else "new"],
                            scratch / f"{name}-{n}", dead_port, extra)
                r = run_side(side, master, n, args)
                r["build_s"] = round(built, 1)
                print(json.dumps(r), flush=True)
                results.append(r)
                rows.append([n, name, r["greet_s"], r["served_s"], r["greet_max_ms"],
                             r["ready_s"], r["loaded_s"], r["rss_loaded_mib"],
                             r["rss_peak_mib"], r["load_cpu_s"], r.get("dead_attempts"),
                             r.get("dead_deferred"), r["drain_rate"], r["rss_drain_mib"],
                             r["others_pct"]])
                if not args.keep:
                    shutil.rmtree(side.root, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(master, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    text = table(["messages", "side", "SMTP greets s", "1st msg 250 s", "greet max ms",
                  "ready s", "loaded s", "RSS MiB", "peak MiB",
                  "load CPU s", "dead: attempts", "dead: deferred", "drain msg/s",
                  "RSS drain MiB", "others CPU%"], rows)
    text += (f"\n\nbase = {args.base}, new = {args.new or 'working tree'}; dead messages "
             f"{args.dead_messages}; drain over {args.drain_seconds:g} s; command: "
             + " ".join(sys.argv))
    print(text)
    print(write_results("queue_bench", text, {"results": results, "args": vars(args)}))


if __name__ == "__main__":
    main()
