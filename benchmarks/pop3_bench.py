"""POP3 retrieval: mailappliance against Dovecot's POP3 server, same Maildir, same run.

    python benchmarks/pop3_bench.py [--messages 1000] [--size 10240]
        [--rounds 5] [--only ours|dovecot] [--source HEAD] [--keep]

One session = connect, USER/PASS, LIST, RETR every message, DELE every message, QUIT (until
the +OK to QUIT, i.e. until the deletions are done). Two client styles, the same raw-socket
client for both servers:
- sequential: one command, wait for its reply, next command (fetchmail, poplib);
- pipelined: all RETRs sent at once, then all DELEs (RFC 2449 PIPELINING, as mpop does).
Two mailbox states:
- cold: the first session on freshly delivered mail (Dovecot builds its index files now);
- warm: after one LIST-only session (Dovecot's indexes exist; both moved new/ to cur/).
The servers take turns in every round; each round refills both Maildirs with byte-identical
files (same names, same mtimes). Every retrieved message is compared with what was delivered.

Reported per configuration (median over rounds): messages/s = messages / session wall time,
and the server's CPU seconds for the session (utime+stime of the server's process tree,
including reaped children such as Dovecot's per-connection pop3 and login processes).

Both servers check a bcrypt (cost 4) hash of the same password: ours from its user store,
Dovecot's passwd-file carries the same hash as {BLF-CRYPT}. Dovecot: Debian's dovecot-pop3d,
private config (base_dir/state_dir/log in the scratch folder), listen 127.0.0.1, ssl = no,
mail as uid 65534 (Dovecot refuses uid 0). Ours: the real `twistd -n mailappliance`.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import common  # noqa: E402  (benchmarks/common.py)

HOST = common.HOST
PASSWORD = "Bench-pass-1!"
# Upper bound on one POP3 session (1,000 x 10 KiB takes well under a second on either server).
SESSION_TIMEOUT = 120.0
# Socket read size of the benchmark client.
RECV = 262144
# Time for a server to reap its per-connection processes before the CPU snapshot is read.
REAP_WAIT = 0.3
DOVECOT = "/usr/sbin/dovecot"
MAIL_UID = 65534     # nobody: Dovecot will not serve mail as root


def make_messages(count: int, size: int) -> list[tuple[str, bytes, float]]:
    """(file name, content with LF line ends, mtime); some lines start with '.' so that
    dot-stuffing is exercised."""
    base = 1_700_000_000
    out = []
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstuvw\n"
    for i in range(count):
        head = (f"Return-Path: <sender{i}@example.org>\nFrom: sender{i}@example.org\n"
                f"To: test@test.com\nSubject: benchmark message {i}\n"
                f"Message-ID: <{i}.bench@example.org>\n\n").encode()
        body = bytearray()
        n = 0
        while len(head) + len(body) < size - len(line):
            body += (b"." + line[1:]) if n % 20 == 7 else line
            n += 1
        content = head + bytes(body)
        content += b"x" * (size - len(content) - 1) + b"\n"
        out.append((f"{base + i}.M{i}P1.bench.example,S={len(content)}", content, base + i))
    return out


def fill_maildir(md: Path, messages, uid: int | None = None) -> None:
    if md.exists():
        shutil.rmtree(md)
    for d in ("tmp", "new", "cur"):
        (md / d).mkdir(parents=True)
    for name, content, mtime in messages:
        p = md / "new" / name
        p.write_bytes(content)
        os.utime(p, (mtime, mtime))
    if uid is not None:
        for root, dirs, files in os.walk(md):
            os.chown(root, uid, uid)
            for f in files:
                os.chown(os.path.join(root, f), uid, uid)


# --- the client --------------------------------------------------------------------------------

class Client:
    """A lean POP3 client: one receive buffer read through an offset (no per-reply copies of
    the rest of the buffer), so it costs far less per message than either server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=SESSION_TIMEOUT)
        self.buf = b""
        self.pos = 0

    def _fill(self) -> None:
        data = self.sock.recv(RECV)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                out = self.buf[self.pos:i]
                self.pos = i + 2
                if not out.startswith(b"+OK"):
                    raise RuntimeError(f"server said {out[:200]!r}")
                return out
            self._fill()

    def multi(self) -> bytes:
        """A multi-line reply; returns the raw (still dot-stuffed) body including its CRLFs."""
        self.line()
        searched = self.pos
        while True:
            if self.buf.startswith(b".\r\n", self.pos):
                self.pos += 3
                return b""
            i = self.buf.find(b"\r\n.\r\n", max(searched, self.pos))
            if i >= 0:
                body = self.buf[self.pos:i + 2]
                self.pos = i + 5
                return body
            searched = len(self.buf) - 4
            before = self.pos
            self._fill()
            searched = max(0, searched - before)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def session(port: int, user: str, count: int, pipelined: bool, list_only: bool = False):
    """One POP3 session; returns (seconds, retrieved bodies)."""
    t0 = time.perf_counter()
    c = Client(port)
    c.line()
    c.send(f"USER {user}\r\n".encode())
    c.line()
    c.send(f"PASS {PASSWORD}\r\n".encode())
    c.line()
    c.send(b"LIST\r\n")
    listing = c.multi()
    listed = listing.count(b"\r\n")
    if listed != count:
        raise RuntimeError(f"LIST shows {listed} messages, expected {count}")
    bodies = []
    if not list_only:
        if pipelined:
            c.send(b"".join(b"RETR %d\r\n" % i for i in range(1, count + 1)))
            bodies = [c.multi() for _ in range(count)]
            c.send(b"".join(b"DELE %d\r\n" % i for i in range(1, count + 1)))
            for _ in range(count):
                c.line()
        else:
            for i in range(1, count + 1):
                c.send(b"RETR %d\r\n" % i)
                bodies.append(c.multi())
            for i in range(1, count + 1):
                c.send(b"DELE %d\r\n" % i)
                c.line()
    c.send(b"QUIT\r\n")
    c.line()
    elapsed = time.perf_counter() - t0
    c.close()
    return elapsed, bodies


def check_bodies(bodies: list[bytes], messages) -> int:
    """Count retrieved messages that differ from what was delivered (after unstuffing).
    Servers may add headers in front (Dovecot does not for POP3; neither do we): compare the
    delivered content as a suffix."""
    bad = 0
    for got, (_, content, _) in zip(bodies, messages):
        lines = got.split(b"\r\n")
        text = b"\n".join(l[1:] if l.startswith(b".") else l for l in lines)
        if not text.endswith(content):
            bad += 1
    return bad + abs(len(bodies) - len(messages))


# --- servers -------------------------------------------------------------------------------------

class Ours:
    name = "mailappliance"

    def __init__(self, root: Path) -> None:
        from tests.integration.server import ServerProcess
        self.proc = ServerProcess(
            root, 'default_domain = "test.com"\n[listen]\n'
            'pop3 = ["tcp:0:interface=127.0.0.1"]\nsmtp = []\nsubmission = []\n',
            hostname="mailappliance.bench.test")
        self.maildir = self.proc.data / "domains" / "test.com" / "test" / "Maildir"
        self.user = "test"

    def start(self) -> "Ours":
        self.proc.root.mkdir(parents=True, exist_ok=True)
        self.proc._write_config()
        self.proc.cli("domain", "add", "test.com")
        self.proc.cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
        self.proc.start()
        self.port = int(self.proc.port("pop3"))
        self.pid = self.proc.proc.pid
        return self

    def password_hash(self) -> str:
        db = sqlite3.connect(self.proc.data / "users.sqlite")
        try:
            return db.execute("SELECT password_hash FROM users WHERE local='test'").fetchone()[0]
        finally:
            db.close()

    def fill(self, messages) -> None:
        fill_maildir(self.maildir, messages)

    def stop(self) -> None:
        self.proc.stop()


class Dovecot:
    name = "dovecot"

    def __init__(self, root: Path, password_hash: str) -> None:
        self.root = root
        self.maildir = root / "mail" / "Maildir"
        self.user = "test"
        self.hash = password_hash
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Dovecot":
        r = self.root
        for d in ("base", "state", "mail"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chown(r / "mail", MAIL_UID, MAIL_UID)
        self.port = common.free_port()
        (r / "passwd").write_text(
            f"test:{{BLF-CRYPT}}{self.hash}:{MAIL_UID}:{MAIL_UID}::{r / 'mail'}::\n")
        conf = r / "dovecot.conf"
        conf.write_text(f"""
base_dir = {r / 'base'}
state_dir = {r / 'state'}
log_path = {r / 'dovecot.log'}
listen = 127.0.0.1
protocols = pop3
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = {MAIL_UID}
mail_location = maildir:{self.maildir}
passdb {{
  driver = passwd-file
  args = scheme=BLF-CRYPT {r / 'passwd'}
}}
userdb {{
  driver = passwd-file
  args = {r / 'passwd'}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
""")
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(r / "dovecot.stderr", "wb"))
        deadline = time.monotonic() + common.PEER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise common.ServerUnavailable(
                    f"dovecot exited {self.proc.returncode}: "
                    f"{(r / 'dovecot.stderr').read_text()[-800:]}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"+OK"):
                        break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise common.ServerUnavailable("dovecot did not start listening")
        # Its auth process may still be starting ("Temporary authentication failure"): wait
        # (bounded) for one good login before measuring anything.
        while True:
            try:
                c = Client(self.port)
                c.line()
                c.send(f"USER {self.user}\r\nPASS {PASSWORD}\r\nQUIT\r\n".encode())
                c.line(), c.line(), c.line()
                c.close()
                break
            except (RuntimeError, OSError) as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise common.ServerUnavailable(f"dovecot refuses the test login: {e}")
                time.sleep(0.2)
        self.pid = self.proc.pid
        return self

    def fill(self, messages) -> None:
        fill_maildir(self.maildir, messages, uid=MAIL_UID)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(common.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(common.STOP_TIMEOUT)


def measure(server, messages, pipelined: bool, warm: bool) -> dict:
    server.fill(messages)
    if warm:
        session(server.port, server.user, len(messages), pipelined=False, list_only=True)
        time.sleep(REAP_WAIT)
    cpu0 = common.cpu_seconds(common.process_tree(server.pid))
    seconds, bodies = session(server.port, server.user, len(messages), pipelined)
    time.sleep(REAP_WAIT)
    cpu = common.cpu_seconds(common.process_tree(server.pid)) - cpu0
    left = sum(len(os.listdir(server.maildir / d)) for d in ("new", "cur"))
    return {"seconds": seconds, "msgs_per_s": len(messages) / seconds, "server_cpu_s": cpu,
            "bad": check_bodies(bodies, messages), "left_in_maildir": left}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=10240)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=("ours", "dovecot"))
    ap.add_argument("--source", help="run our server from this commit or directory")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    if not 1 <= args.messages <= 100_000 or not 100 <= args.size <= 10_000_000:
        ap.error("--messages 1..100000, --size 100..10000000")
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds 1..20")

    scratch = Path(tempfile.mkdtemp(prefix="pop3bench-", dir=common.DEFAULT_SCRATCH))
    os.chmod(scratch, 0o755)          # Dovecot's mail processes run as uid 65534
    source = common.prepare_source(args.source, scratch)
    messages = make_messages(args.messages, args.size)
    busy = common.wait_quiet(60)
    servers = []
    notes = []
    try:
        ours = Ours(scratch / "ours").start()
        if args.only != "dovecot":
            servers.append(ours)
        if args.only != "ours":
            if not os.path.exists(DOVECOT):
                notes.append("dovecot not installed (apt-get install dovecot-pop3d): "
                             "measured mailappliance only")
            else:
                try:
                    servers.append(Dovecot(scratch / "dovecot", ours.password_hash()).start())
                except common.ServerUnavailable as e:
                    notes.append(f"dovecot unavailable: {e}")
        results: dict[str, dict[str, list[dict]]] = {}
        configs = [(p, w) for w in (False, True) for p in (False, True)]
        for rnd in range(args.rounds):
            for pipelined, warm in configs:
                key = f"{'pipelined' if pipelined else 'sequential'}/{'warm' if warm else 'cold'}"
                order = servers if rnd % 2 == 0 else list(reversed(servers))
                for srv in order:
                    r = measure(srv, messages, pipelined, warm)
                    results.setdefault(key, {}).setdefault(srv.name, []).append(r)
                    print(f"round {rnd + 1} {key:20} {srv.name:13} {r['msgs_per_s']:9,.0f} msg/s"
                          f"  cpu {r['server_cpu_s']:.3f} s  bad {r['bad']}"
                          f"  left {r['left_in_maildir']}", flush=True)
    finally:
        for srv in servers:
            srv.stop()
        if "ours" in locals() and ours not in servers:
            ours.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    rows = []
    summary = {}
    for key, per in results.items():
        med = {name: {"msgs_per_s": statistics.median(r["msgs_per_s"] for r in runs),
                      "best_msgs_per_s": max(r["msgs_per_s"] for r in runs),
                      "server_cpu_s": statistics.median(r["server_cpu_s"] for r in runs),
                      "bad": sum(r["bad"] for r in runs),
                      "left": sum(r["left_in_maildir"] for r in runs)}
               for name, runs in per.items()}
        summary[key] = med
        o, d = med.get("mailappliance"), med.get("dovecot")
        rows.append([key,
                     common.fmt(o and o["msgs_per_s"]), common.fmt(d and d["msgs_per_s"]),
                     common.ratio(o and o["msgs_per_s"], d and d["msgs_per_s"]),
                     common.fmt(o and o["best_msgs_per_s"]), common.fmt(d and d["best_msgs_per_s"]),
                     common.ratio(o and o["best_msgs_per_s"], d and d["best_msgs_per_s"]),
                     common.fmt(o and o["server_cpu_s"], 2), common.fmt(d and d["server_cpu_s"], 2),
                     f"{o['bad'] if o else '-'}/{d['bad'] if d else '-'}",
                     f"{o['left'] if o else '-'}/{d['left'] if d else '-'}"])
    text = "\n".join([
        f"POP3 retrieval: {args.messages} x {args.size} B, login + LIST + RETR all + DELE all"
        f" + QUIT, median of {args.rounds} rounds",
        f"machine busy before start: {busy:.0f}% of one core; source: {source or 'working tree'}",
        *notes, "",
        common.table(["session", "ours msg/s", "dovecot msg/s", "ratio", "ours best",
                      "dovecot best", "ratio", "ours CPU s", "dovecot CPU s", "bad (o/d)",
                      "left (o/d)"], rows),
        "msg/s and CPU s: medians over the rounds; best: the fastest round (least disturbed by"
        " other load);",
        "CPU s: server process tree utime+stime for the session, in 10 ms clock ticks;"
        " bad: retrieved messages that differ from the delivered ones; left: files left"
        " after DELE all + QUIT.",
        "",
        "command: " + " ".join([os.path.basename(sys.executable), *sys.argv]),
    ])
    print()
    print(text)
    dovecot_version = ""
    if os.path.exists(DOVECOT):
        dovecot_version = subprocess.run([DOVECOT, "--version"], capture_output=True,
                                         text=True, timeout=10).stdout.strip()
    path = common.write_results("pop3", text, {
        "args": vars(args), "summary": summary, "raw": results, "notes": notes,
        "machine": common.machine_info(), "dovecot": dovecot_version, "busy_pct": busy})
    print(f"results: {path}")
    bad = any(v["bad"] or v["left"] for per in summary.values() for v in per.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
