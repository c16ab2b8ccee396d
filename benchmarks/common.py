"""Shared parts of the SMTP and end-to-end benchmarks.

- servers under test, each started fresh in a scratch folder and stopped by PID:
  `OurServer` (the real ``twistd -n mailappliance`` through tests/integration/server.py, kernel-
  chosen ports read from data/run/ready.json), `AiosmtpdPeer` (benchmarks/peers/aiosmtpd_maildir.py)
  and `PostfixPeer` (benchmarks/peers/postfix.py, a private instance);
- /proc sampling: RSS and CPU seconds of a process and its descendants;
- postfix's smtp-source as load generator, and Message-Id scanning to verify what is on disk;
- a Maildir watcher process (inotify through ctypes) that timestamps arrivals in new/;
- py-spy profiles folded into a list of hot spots;
- result tables with ratios against the peer measured in the same run.

Everything listens on and connects to 127.0.0.1 only; every wait is bounded in time.
The watcher runs as ``python benchmarks/common.py watch DIR`` (see `watch_main`).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import datetime
import json
import os
import re
import select
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
DOMAIN = "test.com"
RCPT = "test@test.com"
SENDER = "a@test.com"
SMTP_SOURCE = "/usr/sbin/smtp-source"
PYTHON = sys.executable
RESULTS_DIR = BENCH_DIR / "results"
# Scratch space for servers under test: on the real disk (ext4 here), not tmpfs, or the
# fsync figures mean nothing.  /var/tmp is on the root file system on this machine.
DEFAULT_SCRATCH = Path("/var/tmp")

# Upper bound for a peer to start listening (aiosmtpd starts in well under a second).
PEER_START_TIMEOUT = 30.0
# Upper bound for a peer to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 15.0
# After a load run, how long to wait for delivery to settle (queue empty, or no change in
# SETTLE_QUIET seconds).  Postfix drains thousands of queued messages in a few seconds here.
SETTLE_TIMEOUT = 180.0
SETTLE_QUIET = 3.0
# Bytes of a message file read to find its Message-Id / X-Bench-Id (headers come first; our
# Received: line and the peers' Return-Path/Delivered-To lines are well under this).
HEADER_READ = 8192
# Interval between RSS samples while a load runs.
RSS_SAMPLE_INTERVAL = 0.2

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- /proc sampling -------------------------------------------------------------------------------

def _stat_fields(pid: int, tid: int | None = None) -> list[str] | None:
    """Fields of /proc/PID/stat after comm (of one thread: /proc/PID/task/TID/stat)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2:].split()


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat_fields(int(name))
            if f is not None:
                kids[int(f[1])].append(int(name))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = children_map()
    out, todo = [], [pid]
    while todo and len(out) < 10000:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime of the processes plus cutime+cstime (their reaped children)."""
    total = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is not None:
            # fields after comm: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """utime+stime of one thread of a process (tid == pid: its main thread)."""
    f = _stat_fields(pid, tid)
    if f is None:
        raise ProcessLookupError(f"no thread {tid} in process {pid}")
    return (int(f[11]) + int(f[12])) / CLK_TCK


def rss_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_KIB
        except (OSError, ValueError, IndexError):
            pass
    return total


def system_busy_seconds() -> float:
    """CPU seconds spent not idle by the whole machine since boot (all cores), /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


# The machine is shared (other people run tests and benchmarks on its 2 cores): before
# measuring, wait until the machine's other load is below QUIET_BUSY_PCT of one core over
# QUIET_WINDOW seconds, for at most the given time; then go on and report the load seen.
QUIET_BUSY_PCT = 25.0
QUIET_WINDOW = 3.0


def wait_quiet(max_wait: float) -> float:
    """Returns the machine's busy CPU% (of one core) in the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = system_busy_seconds()
        time.sleep(QUIET_WINDOW)
        busy = 100.0 * (system_busy_seconds() - b0) / QUIET_WINDOW
        if busy < QUIET_BUSY_PCT or time.monotonic() >= deadline:
            return busy


class Meter:
    """CPU seconds and peak RSS of a process tree over a block of code.

        with Meter(pid) as m: ...;   m.cpu, m.peak_rss_kib, m.wall
    """

    def __init__(self, pid: int | list[int], tree: bool = False) -> None:
        self.pid = pid          # or several: the sum over their processes (trees)
        self.tree = tree
        self.peak_rss_kib = 0
        self._stop = threading.Event()

    def pids(self) -> list[int]:
        roots = self.pid if isinstance(self.pid, list) else [self.pid]
        return [p for r in roots for p in process_tree(r)] if self.tree else roots

    def _sample(self) -> None:
        deadline = time.monotonic() + 24 * 3600
        while not self._stop.wait(RSS_SAMPLE_INTERVAL) and time.monotonic() < deadline:
            self.peak_rss_kib = max(self.peak_rss_kib, rss_kib(self.pids()))

    def __enter__(self) -> "Meter":
        self._cpu0 = cpu_seconds(self.pids())
        self._sys0 = system_busy_seconds()
        self._t0 = time.monotonic()
        self.peak_rss_kib = rss_kib(self.pids())
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self._t0
        self.cpu = cpu_seconds(self.pids()) - self._cpu0
        # Whole machine, all processes (ours, the client, everybody else), % of one core.
        self.system_busy_pct = 100.0 * (system_busy_seconds() - self._sys0) / self.wall
        self._stop.set()
        self._thread.join(5)
        self.peak_rss_kib = max(self.peak_rss_kib, rss_kib(self.pids()))


# --- servers under test -----------------------------------------------------------------------

class ServerUnavailable(RuntimeError):
    """The server under test did not start or does not speak SMTP (yet)."""


def free_port() -> int:
    """A currently free loopback port, for Postfix's master.cf (it cannot listen on port 0)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def check_smtp(port: int, timeout: float = 10.0) -> str:
    """Send one message with smtplib; returns the final reply text, raises ServerUnavailable."""
    try:
        with smtplib.SMTP(HOST, port, timeout=timeout) as c:
            c.ehlo("bench.test")
            refused = c.sendmail(SENDER, [RCPT], b"Subject: warm-up\r\nMessage-Id: "
                                 b"<warm-up@bench.test>\r\n\r\nwarm-up\r\n")
            if refused:
                raise ServerUnavailable(f"recipient refused: {refused}")
            return "ok"
    except (OSError, smtplib.SMTPException) as e:
        raise ServerUnavailable(f"SMTP on 127.0.0.1:{port} refused the warm-up message: "
                                f"{type(e).__name__}: {e}") from e


def _wait_pid_exit(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(STOP_TIMEOUT)


def prepare_source(source: str | None, scratch: Path) -> str | None:
    """Which mailappliance code our server runs.  None: the working tree (the editable install).
    "HEAD" (or any commit): `git archive` of it into the scratch folder, so edits in progress in
    the shared working tree cannot break or change a run.  A directory: that tree.  The choice is
    passed on as PYTHONPATH to the server and the `mailappliance` commands.  Returns a label."""
    if not source:
        return None
    if Path(source).is_dir():
        path = Path(source).resolve()
    else:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", source],
                                capture_output=True, text=True, timeout=30, check=True)
        sha = commit.stdout.strip()
        path = scratch / f"source-{sha[:12]}"
        path.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], capture_output=True,
                                 timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive, timeout=60, check=True)
        source = f"{source} ({sha[:12]})"
    os.environ["PYTHONPATH"] = str(path) + (os.pathsep + os.environ["PYTHONPATH"]
                                            if os.environ.get("PYTHONPATH") else "")
    return f"{source} from {path}"


class OurServer:
    """`twistd -n mailappliance` with domain test.com and user test@test.com in `root`."""

    name = "mailappliance"
    # Limits raised for the benchmark: 20 sessions from one IP exceed the default
    # max_per_ip of 10, and the idle test holds 1,000 connections (DESIGN.md defaults are
    # tcpserver's -c 40 and 10 per IP).
    CONFIG = ('default_domain = "test.com"\n'
              "[smtp]\n"
              "max_connections = {maxconn}\n"
              "max_per_ip = {maxconn}\n")

    def __init__(self, root: Path, max_connections: int = 1200, env: dict | None = None) -> None:
        from tests.integration.server import ServerProcess
        self.root = Path(root)
        self.proc = ServerProcess(self.root, self.CONFIG.format(maxconn=max_connections),
                                  hostname="mailappliance.bench.test", env=env)
        self.data = self.proc.data
        self.maildir = self.data / "domains" / DOMAIN / "test" / "Maildir"
        self.queue_dir = self.data / "queue"
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def start(self) -> "OurServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc._write_config()
        try:
            self.proc.cli("domain", "add", DOMAIN)
            self.proc.cli("user", "add", RCPT, "--password-stdin", input="Bench-pass-1!\n")
            self.proc.start()
        except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as e:
            raise ServerUnavailable(f"our server did not start: {e}") from e
        ports = self.proc.ports.get("smtp") or []
        if not ports:
            out = self.proc.output()
            hint = "; ".join(l for l in out.splitlines() if "not available" in l)[-400:]
            self.stop()
            raise ServerUnavailable("our server started but has no SMTP listener "
                                    f"(ready.json: {self.proc.ports}) {hint}")
        self.port = int(ports[0])
        try:
            check_smtp(self.port)
        except ServerUnavailable:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.proc.stop()

    def message_files(self) -> list[Path]:
        """Maildir files plus committed queue entries (pending or not yet cleaned up)."""
        out = maildir_files(self.maildir)
        mess = self.queue_dir / "mess"
        try:
            out += [e for e in mess.iterdir() if e.name.isdigit()]
        except FileNotFoundError:
            pass
        return out

    def pending(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.queue_dir / "mess") if e.name.isdigit())
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.proc.output().splitlines()[-lines:])


class AiosmtpdPeer:
    """benchmarks/peers/aiosmtpd_maildir.py as a separate process (its own core, its own RSS)."""

    name = "aiosmtpd"

    def __init__(self, root: Path, executor: int = 0) -> None:
        self.root = Path(root)
        self.maildir = self.root / "Maildir"
        self.ready = self.root / "ready.json"
        self.executor = executor
        self.popen: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def start(self) -> "AiosmtpdPeer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / "aiosmtpd.out", "ab")
        self.popen = subprocess.Popen(
            [PYTHON, str(BENCH_DIR / "peers" / "aiosmtpd_maildir.py"), "--maildir",
             str(self.maildir), "--ready", str(self.ready), "--executor", str(self.executor)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + PEER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ServerUnavailable(f"aiosmtpd exited with {self.popen.returncode}")
            try:
                info = json.loads(self.ready.read_text())
                if info["pid"] == self.popen.pid:
                    self.port = int(info["port"])
                    check_smtp(self.port)
                    return self
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        self.stop()
        raise ServerUnavailable("aiosmtpd did not start in time")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            _wait_pid_exit(self.popen)

    def message_files(self) -> list[Path]:
        return maildir_files(self.maildir)

    def pending(self) -> int:
        return 0


class PostfixPeer:
    """A private Postfix instance (benchmarks/peers/postfix.py); CPU/RSS measured over its tree."""

    name = "postfix"

    def __init__(self, root: Path) -> None:
        from benchmarks.peers.postfix import PostfixInstance
        self.inst = PostfixInstance(Path(root), free_port())
        self.maildir = self.inst.maildir
        self.port = self.inst.port

    @property
    def pid(self) -> int:
        pid = self.inst.master_pid()
        if pid is None:
            raise ServerUnavailable("postfix master pid file missing")
        return pid

    def start(self) -> "PostfixPeer":
        try:
            self.inst.setup()
            self.inst.start()
        except Exception as e:  # PostfixError, OSError, TimeoutExpired: all mean "no peer"
            raise ServerUnavailable(f"private postfix did not start: {e}") from e
        check_smtp(self.port)
        return self

    def stop(self) -> None:
        self.inst.stop()

    def message_files(self) -> list[Path]:
        return maildir_files(self.maildir)

    def pending(self) -> int:
        return self.inst.queue_count()

    def log_tail(self, lines: int = 15) -> str:
        return self.inst.log_tail(lines)


# --- messages on disk ---------------------------------------------------------------------------

def maildir_files(maildir: Path) -> list[Path]:
    out: list[Path] = []
    for sub in ("new", "cur"):
        try:
            out += [Path(e.path) for e in os.scandir(maildir / sub) if e.is_file()]
        except FileNotFoundError:
            pass
    return out


def count_new(maildir: Path) -> int:
    """Files in maildir/new (0 while it does not exist yet)."""
    try:
        return sum(1 for _ in os.scandir(maildir / "new"))
    except FileNotFoundError:
        return 0


# How long a run's deliveries may take in all, and how long nothing may arrive before the
# wait gives up (delivery is not running); how often the Maildir is counted.
DELIVERY_TIMEOUT = 180.0
DELIVERY_STALL = 15.0
DELIVERY_POLL = 0.02


def wait_delivered(maildir: Path, before: int, count: int,
                   timeout: float = DELIVERY_TIMEOUT) -> float:
    """Wait until `count` more files are in maildir/new than `before`, or nothing new came for
    DELIVERY_STALL seconds; -> seconds waited."""
    t0 = last_change = time.monotonic()
    last = -1
    while time.monotonic() - t0 < timeout:
        n = count_new(maildir) - before
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        if n >= count or now - last_change > DELIVERY_STALL:
            break
        time.sleep(DELIVERY_POLL)
    return time.monotonic() - t0


_HEADER_RE = {
    "message-id": re.compile(rb"^message-id:[ \t]*(\S+)", re.I | re.M),
    "x-bench-id": re.compile(rb"^x-bench-id:[ \t]*(\S+)", re.I | re.M),
}


class HeaderCache:
    """Path -> header value, reading each file's head once (files are immutable once named)."""

    def __init__(self, header: str) -> None:
        self.regex = _HEADER_RE[header]
        self.cache: dict[Path, bytes | None] = {}

    def get(self, path: Path) -> bytes | None:
        if path not in self.cache:
            try:
                with open(path, "rb") as f:
                    head = f.read(HEADER_READ)
            except FileNotFoundError:
                return None   # moved (queue entry delivered and removed): do not cache
            end = head.find(b"\n\n")
            end2 = head.find(b"\r\n\r\n")
            cut = min(x for x in (end, end2, len(head)) if x >= 0)
            m = self.regex.search(head[:cut])
            self.cache[path] = m.group(1) if m else None
        return self.cache[path]

    def ids(self, paths: Iterable[Path]) -> collections.Counter:
        c: collections.Counter = collections.Counter()
        for p in paths:
            v = self.get(p)
            if v is not None:
                c[v] += 1
        return c


def settle(server, expect_total: int | None = None, timeout: float = SETTLE_TIMEOUT) -> float:
    """Wait until the server's queue is empty (and, if given, expect_total files are visible) or
    nothing changed for SETTLE_QUIET seconds.  Returns the seconds waited."""
    t0 = time.monotonic()
    last, last_change = None, t0
    while time.monotonic() - t0 < timeout:
        pending = server.pending()
        visible = len(server.message_files())
        state = (pending, visible)
        now = time.monotonic()
        if state != last:
            last, last_change = state, now
        if pending == 0 and (expect_total is None or visible >= expect_total):
            break
        if now - last_change >= SETTLE_QUIET:
            break
        time.sleep(0.1)
    return time.monotonic() - t0


# --- smtp-source ----------------------------------------------------------------------------------

def run_smtp_source(port: int, sessions: int, messages: int, size: int,
                    timeout: float) -> dict:
    """Run smtp-source once; wall time, exit status, stderr, and its own CPU."""
    if not os.access(SMTP_SOURCE, os.X_OK):
        raise RuntimeError(f"{SMTP_SOURCE} missing (Debian package postfix)")
    cmd = [SMTP_SOURCE, "-4", "-M", "localhost", "-s", str(sessions), "-m", str(messages),
           "-l", str(size), "-f", SENDER, "-t", RCPT, f"{HOST}:{port}"]
    t0 = time.monotonic()
    r0 = os.times()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, err = res.returncode, res.stderr.strip()
    except subprocess.TimeoutExpired as e:
        rc, err = -1, f"timed out after {timeout:.0f}s; {(e.stderr or b'')[-300:]!r}"
    wall = time.monotonic() - t0
    r1 = os.times()
    client_cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    return {"cmd": " ".join(cmd), "wall": wall, "rc": rc, "stderr": err[-500:],
            "client_cpu": client_cpu}


async def read_smtp_reply(reader: "asyncio.StreamReader", timeout: float) -> bytes:
    """Read one SMTP reply (possibly multi-line) within `timeout` s; return its last line."""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("server closed the connection")
        if len(line) < 4 or line[3:4] != b"-":
            return line


# --- idle connections -----------------------------------------------------------------------------

# Connections opened but not yet greeted, at most: a burst of 1,000 SYNs overflows the server's
# listen backlog (Twisted's default is 50), and with SYN cookies a client whose final ACK was
# dropped believes it is connected while the server never accepts it, so it waits for a
# greeting forever.  Pacing the connects keeps the test about idle sessions, not the backlog.
IDLE_INFLIGHT = 32


def open_idle(port: int, count: int, timeout: float = 120.0) -> tuple[list[socket.socket], int]:
    """Open `count` connections that read the greeting and then stay idle.
    Returns (sockets, number that received a 220 greeting)."""
    socks: list[socket.socket] = []
    greeted = 0
    deadline = time.monotonic() + timeout
    poller = select.epoll()
    pending: dict[int, socket.socket] = {}
    bufs: dict[int, bytes] = {}
    try:
        while (len(socks) < count or pending) and time.monotonic() < deadline:
            while len(socks) < count and len(pending) < IDLE_INFLIGHT:
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect((HOST, port))
                except BlockingIOError:
                    pass
                socks.append(s)
                pending[s.fileno()] = s
                bufs[s.fileno()] = b""
                poller.register(s.fileno(), select.EPOLLIN)
            for fd, _ev in poller.poll(0.2):
                greeted += _read_greeting(pending, bufs, fd, poller)
    finally:
        poller.close()
    for s in socks:
        s.setblocking(True)
    return socks, greeted


def _read_greeting(pending, bufs, fd, poller) -> int:
    s = pending.get(fd)
    if s is None:
        return 0
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return 0
    except OSError:
        data = b""
    bufs[fd] += data
    if not data or b"\n" in bufs[fd]:
        poller.unregister(fd)
        del pending[fd]
        return 1 if bufs[fd].startswith(b"220") else 0
    return 0


def idle_rss(server, count: int, hold: float = 2.0) -> dict:
    """RSS of the server before and with `count` idle connections (each has read the 220)."""
    before = rss_kib([server.pid])
    socks, greeted = open_idle(server.port, count)
    time.sleep(hold)   # let the server finish any per-connection set-up it defers
    during = rss_kib([server.pid])
    for s in socks:
        try:
            s.close()
        except OSError:
            pass
    return {"connections": count, "greeted": greeted, "rss_before_kib": before,
            "rss_idle_kib": during,
            "kib_per_conn": (during - before) / greeted if greeted else None}


# --- the Maildir watcher ------------------------------------------------------------------------

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
# Upper bound on a watcher's life, whatever its parent does.
WATCH_MAX_SECONDS = 3600.0


def watch_main(argv: list[str]) -> int:
    """``common.py watch DIR OUT``: timestamp (time.monotonic) every name created in or renamed
    into DIR, until stdin closes; then write "t name" lines to OUT.  Runs as its own process so
    the benchmark client's GIL never delays a timestamp.  Prints "ready" once the watch is set."""
    directory, out = argv
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    wd = libc.inotify_add_watch(fd, os.fsencode(directory), IN_CREATE | IN_MOVED_TO)
    if wd < 0:
        raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
    records: list[tuple[float, bytes]] = []
    overflow = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(sys.stdin.fileno(), select.POLLIN | select.POLLHUP)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    deadline = time.monotonic() + WATCH_MAX_SECONDS
    done = False
    while not done and time.monotonic() < deadline:
        for what, _ev in poller.poll(1000):
            if what == fd:
                try:
                    buf = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                now = time.monotonic()
                off = 0
                while off + _EVENT.size <= len(buf):
                    _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                    name = buf[off + _EVENT.size: off + _EVENT.size + length].rstrip(b"\0")
                    off += _EVENT.size + length
                    if mask & IN_Q_OVERFLOW:
                        overflow += 1
                    elif name:
                        records.append((now, name))
            else:
                done = True
    os.close(fd)
    with open(out, "wb") as f:
        f.write(b"overflow %d\n" % overflow)
        for t, name in records:
            f.write(b"%.6f %s\n" % (t, name))
    return 0


class MaildirWatcher:
    """Parent side of the watcher process: start(), stop() -> ({name: t}, overflow count)."""

    def __init__(self, directory: Path, out: Path) -> None:
        self.directory = Path(directory)
        self.out = Path(out)
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        self.popen = subprocess.Popen([PYTHON, __file__, "watch", str(self.directory),
                                       str(self.out)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE)
        line = self.popen.stdout.readline()
        if line.strip() != b"ready":
            self.popen.kill()
            raise RuntimeError(f"maildir watcher failed to start: {line!r}")

    def stop(self) -> tuple[dict[str, float], int]:
        self.popen.stdin.close()
        _wait_pid_exit(self.popen)
        arrivals: dict[str, float] = {}
        overflow = 0
        with open(self.out, "rb") as f:
            for line in f:
                a, b = line.rstrip(b"\n").split(b" ", 1)
                if a == b"overflow":
                    overflow = int(b)
                else:
                    arrivals.setdefault(b.decode("utf-8", "replace"), float(a))
        return arrivals, overflow


# --- profiling ------------------------------------------------------------------------------------

PY_SPY = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")


PROFILE_RATE = 200   # py-spy samples per second


def _idle_leaves() -> tuple[str, ...]:
    """Leaf frames that mean "waiting, not working".  py-spy without --idle still reports
    threads blocked in some waits, so these are filtered here: idle pool threads (a condition
    wait in the work queue) and the reactor's epoll wait (found by its source line, which
    changes between Twisted versions)."""
    leaves = ["Condition.wait (threading.py", "Queue.get (queue.py"]
    try:
        import inspect

        from twisted.internet import epollreactor
        src, first = inspect.getsourcelines(epollreactor.EPollReactor.doPoll)
        for i, text in enumerate(src):
            if "_poller.poll(" in text:
                leaves.append(f"EPollReactor.doPoll (twisted/internet/epollreactor.py:{first + i})")
    except Exception:  # noqa: BLE001 - without Twisted here, only the pool waits are known
        pass
    return tuple(leaves)


def py_spy_record(pid: int, seconds: int, out: Path) -> subprocess.Popen | None:
    """Start `py-spy record` on pid: folded stacks of every thread py-spy sees as active (no
    --idle; summarize_folded also drops the known waits: epoll, idle pool threads), so samples
    per thread / (seconds x rate) is that thread's active share, system calls such as fsync
    included.  None if py-spy is missing (`pip install py-spy`)."""
    if not os.access(PY_SPY, os.X_OK):
        return None
    return subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--duration", str(seconds),
                             "--rate", str(PROFILE_RATE), "--format", "raw", "--threads",
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarize_folded(path: Path, seconds: float, top: int = 15) -> dict:
    """Hot spots from py-spy's raw (folded) output, per thread role: the reactor thread
    ("main") and the thread pool ("pool").  For each role: CPU share (samples / (seconds x
    rate); the pool has several threads, so it can pass 100 %), and the top functions by self
    and by inclusive time (percent of that role's samples)."""
    roles: dict[str, dict] = {}
    idle = _idle_leaves()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {"error": f"{path} missing"}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        head = frames[0] if frames and frames[0].startswith(("thread ", "process ")) else ""
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        name = head.split(": ", 1)[1] if ": " in head else head
        role = "main" if name.startswith("MainThread") else (
            "pool" if "PoolThread" in name else "other")
        r = roles.setdefault(role, {"samples": 0, "self": collections.Counter(),
                                    "incl": collections.Counter()})
        if not frames or any(frames[-1].startswith(m) for m in idle):
            continue
        r["samples"] += n
        if frames:
            r["self"][frames[-1]] += n
            for f in set(frames):
                r["incl"][f] += n
    out: dict = {}
    for role, r in roles.items():
        n = r["samples"]
        out[role] = {
            "samples": n, "cpu_pct": round(100.0 * n / (seconds * PROFILE_RATE), 1),
            "top_self": [(f, round(100.0 * c / n, 1)) for f, c in r["self"].most_common(top)],
            "top_inclusive": [(f, round(100.0 * c / n, 1))
                              for f, c in r["incl"].most_common(top + 15)],
        }
    return out


# Frames of the reactor loop itself, left out of the inclusive list (they include everything).
_LOOP_FRAMES = ("<module>", "run (", "runApp", "postApplication", "startReactor", "mainLoop",
                "ReactorBase.run", "doIteration", "doPoll", "_doReadOrWrite", "callWithLogger",
                "callWithContext", "context.py", "log.py", "runReactorWithLogging",
                "_bootstrap", "Thread.run", "_threadworker.py", "_team.py", "threadpool.py")


def profile_lines(path: Path, seconds: float, title: str, top: int = 12) -> list[str]:
    """Report lines for summarize_folded."""
    s = summarize_folded(path, seconds)
    if "error" in s:
        return ["", f"{title}: {s['error']}"]
    lines = ["", f"{title} (py-spy {PROFILE_RATE} Hz, {seconds:.0f} s, waiting threads left out)"]
    for role in ("main", "pool", "other"):
        r = s.get(role)
        if not r:
            continue
        lines.append(f"{role} thread(s): active {r['cpu_pct']}% of one core (running, or in "
                     "a system call such as fsync); top self time (% of this role's samples):")
        lines += [f"  {pct:5.1f}%  {f}" for f, pct in r["top_self"][:top]]
        incl = [(f, p) for f, p in r["top_inclusive"] if not any(k in f for k in _LOOP_FRAMES)]
        lines.append("  inclusive:")
        lines += [f"  {pct:5.1f}%  {f}" for f, pct in incl[:top]]
    return lines


# --- tables and results -------------------------------------------------------------------------

def fmt(v, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def ratio(ours, peer) -> str:
    if not ours or not peer:
        return "-"
    return f"{ours / peer:.2f}x"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w)
                               in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
            "kernel": os.uname().release, "loadavg": open("/proc/loadavg").read().strip()}
    try:
        info["postfix"] = subprocess.run(["/usr/sbin/postconf", "-dh", "mail_version"],
                                         capture_output=True, text=True,
                                         timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_results(name: str, text: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = RESULTS_DIR / f"{stamp}-{name}"
    base.with_suffix(".txt").write_text(text + "\n")
    base.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return base.with_suffix(".txt")


async def paced(count: int, rate: float, sessions: int, one) -> None:
    """An open loop: `one(i)` (a coroutine function that records its own result) starts at
    t0 + i/rate, at most `sessions` at once; returns when all `count` have ended."""
    sem = asyncio.Semaphore(sessions)

    async def run(i: int) -> None:
        try:
            await one(i)
        finally:
            sem.release()

    t0 = time.monotonic()
    tasks = []
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await sem.acquire()
        tasks.append(asyncio.ensure_future(run(i)))
    await asyncio.gather(*tasks)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "watch":
        sys.exit(watch_main(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
