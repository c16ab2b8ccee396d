"""Peers that misbehave on purpose, against the real server on loopback (docs/LIMITS.md):
a client that pipelines commands and never reads the replies, a client that trickles one byte
at a time, a descriptor flood under a lowered RLIMIT_NOFILE, and many parallel connections
guessing passwords from one address.

Each test measures the server from outside (its RSS in /proc, its log, what a second client
gets) and fails on the server as it was before the bound existed."""

from __future__ import annotations

import os
import poplib
import re
import resource
import select
import smtplib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from tests.integration.opstools import log_text, wait_for, wait_for_log

pytestmark = pytest.mark.integration

PASSWORD = "Passw0rd!"
IO_TIMEOUT = 20.0
# The non-reading client: its receive buffer is this small (the 4 KiB), and it sends
# at most this many bytes of commands. A server that answers all of them holds about 20 times
# as much in replies (an EHLO reply is ~20 times its command), far above the bound below.
SMALL_RCVBUF = 4096
FLOOD_BYTES = 6 * 1024 * 1024
# POP3's short answers (STAT: 9 octets for 6) need more commands to show the same growth.
POP3_FLOOD_BYTES = 16 * 1024 * 1024
# The client stops when the server has stopped reading for this long (sends would block).
STALL_SECONDS = 3.0
# Growth of the server's resident memory allowed while the client floods: the bounded
# output (docs/LIMITS.md: 64 KiB of unsent replies, one read of pipelined input) plus the
# interpreter's and the kernel's noise. Before the bound: 57-98 MiB for SMTP EHLO.
RSS_GROWTH_BOUND = 12 * 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def flood(sock: socket.socket, command: bytes, limit: int) -> int:
    """Send `command` over and over without reading, until FLOOD_BYTES are sent or the server
    has not taken a byte for STALL_SECONDS. Returns the bytes sent."""
    sock.setblocking(False)
    chunk = command * (65536 // len(command))
    sent = 0
    while sent < limit:
        _, writable, _ = select.select([], [sock], [], STALL_SECONDS)
        if not writable:
            break                       # the server stopped reading: flow control works
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            continue
    return sent


def non_reading_client(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    s.settimeout(IO_TIMEOUT)
    s.connect(("127.0.0.1", port))
    return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        got = s.recv(1)
        if not got:
            break
        data += got
    return data


def measure_growth(server, port: int, prelude: list[bytes], command: bytes,
                   limit: int = FLOOD_BYTES) -> tuple[int, int]:
    s = non_reading_client(port)
    try:
        read_line(s)                                     # the greeting
        for line in prelude:
            s.sendall(line)
            read_line(s)
        # Warm up the session's code paths before the baseline.
        s.sendall(command * 4)
        for _ in range(4):
            read_line(s)
        before = rss(server.proc.pid)
        sent = flood(s, command, limit)
        after = rss(server.proc.pid)
        print(f"{command!r}: sent {sent} bytes, server RSS {before} -> {after}")
        return after - before, sent
    finally:
        s.close()


def test_smtp_client_that_never_reads_costs_bounded_memory(server):
    growth, sent = measure_growth(server, server.port("smtp"), [], b"EHLO x\r\n")
    assert growth < RSS_GROWTH_BOUND, (growth, sent)
    assert sent < FLOOD_BYTES, "the server read everything: no flow control"


def test_submission_client_that_never_reads_costs_bounded_memory(server):
    growth, sent = measure_growth(server, server.port("submission"), [], b"EHLO x\r\n")
    assert growth < RSS_GROWTH_BOUND, (growth, sent)
    assert sent < FLOOD_BYTES, "the server read everything: no flow control"


def test_pop3_client_that_never_reads_costs_bounded_memory(server):
    growth, sent = measure_growth(server, server.port("pop3"),
                                  [b"USER test@test.com\r\n", f"PASS {PASSWORD}\r\n".encode()],
                                  b"STAT\r\n", POP3_FLOOD_BYTES)
    assert growth < RSS_GROWTH_BOUND, (growth, sent)
    assert sent < POP3_FLOOD_BYTES, "the server read everything: no flow control"


# --- brute force: parallel connections from one address -----------------------------------------

GUESSERS = 10
# One connection's schedule (docs/LIMITS.md, access/penalty.py): the k-th check from an address
# starts at least this long after its first (2, 4, 8 s penalties, bcrypt time on top).
ONE_CONNECTION_SCHEDULE = (0.0, 2.0, 6.0, 14.0)
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z "
                      r"(?:pop3: login|smtp: auth) failed: rip=(\S+) ", re.M)


def failure_times(text: str, ip: str) -> list[float]:
    return [datetime.fromisoformat(stamp).timestamp()
            for stamp, rip in LOG_TIME.findall(text) if rip == ip]


class Guessers:
    """GUESSERS threads, each a poplib client from `ip` that guesses a wrong password again as
    soon as it is answered, and reconnects when the server closes it; with `smtp`, every other
    thread guesses over SMTP AUTH (submission) instead."""

    def __init__(self, server, ip: str, smtp: bool = False) -> None:
        self.server, self.ip, self.smtp = server, ip, smtp
        self.stopping = False
        self.clients: set = set()

    def _run_smtp(self) -> None:
        import smtplib
        while not self.stopping:
            try:
                c = smtplib.SMTP("127.0.0.1", self.server.port("submission"), timeout=120,
                                 source_address=(self.ip, 0))
            except OSError:
                continue
            self.clients.add(c)
            try:
                c.ehlo("guesser.example")
                while not self.stopping:
                    try:
                        c.login("test@test.com", "wrong-Passw0rd!")
                    except smtplib.SMTPAuthenticationError:
                        pass
            except (OSError, smtplib.SMTPException):
                pass
            finally:
                self.clients.discard(c)
                c.close()

    def _run(self, n: int = 0) -> None:
        from tests.integration.test_pop3_server import POP3From
        if self.smtp and n % 2:
            return self._run_smtp()
        while not self.stopping:
            try:
                p = POP3From("127.0.0.1", self.server.port("pop3"), self.ip, timeout=120)
            except OSError:
                continue
            self.clients.add(p)
            try:
                while not self.stopping:
                    p.user("test")
                    try:
                        p.pass_("wrong-Passw0rd!")
                    except poplib.error_proto:
                        pass
            except (OSError, EOFError, poplib.error_proto):
                pass
            finally:
                self.clients.discard(p)
                p.close()

    def __enter__(self) -> "Guessers":
        self.pool = ThreadPoolExecutor(GUESSERS)
        self.futures = [self.pool.submit(self._run, n) for n in range(GUESSERS)]
        return self

    def __exit__(self, *exc) -> None:
        self.stopping = True
        for p in list(self.clients):
            try:
                p.sock.shutdown(socket.SHUT_RDWR)     # unblock a client waiting for its turn
            except (OSError, AttributeError):       # (an SMTP client not yet connected)
                pass
        self.pool.shutdown(wait=True)


def test_parallel_connections_from_one_address_get_the_checks_of_one(server):
    """Ten poplib connections from one address guessing at once: the log's own clock shows the
    checks one connection would get (at most the k-th by its k-th schedule point), not ten at
    each penalty's end (issue 18: 20 checks in 20 s)."""
    ip = "127.0.0.40"
    with Guessers(server, ip):
        wait_for_log(server, *[f"rip={ip} user=<test> tls=no delay={d}s"
                               for d in ("2", "4", "8", "15")], timeout=60)
    times = failure_times(wait_for_log(server, f"rip={ip}"), ip)
    offsets = [t - times[0] for t in times]
    assert len(offsets) >= len(ONE_CONNECTION_SCHEDULE)
    for k, earliest in enumerate(ONE_CONNECTION_SCHEDULE):
        assert offsets[k] >= earliest, offsets
    within = [o for o in offsets if o < ONE_CONNECTION_SCHEDULE[-1]]
    assert len(within) <= len(ONE_CONNECTION_SCHEDULE) - 1, offsets


def test_parallel_pop3_and_smtp_auth_guesses_from_one_address_share_one_schedule(make_server):
    """Five POP3 and five SMTP AUTH connections from one address guessing at once: the penalty
    table is one for both protocols, so together they still get the checks of one connection
    (issue 18: "also for SMTP AUTH; the table is shared")."""
    ip = "127.0.0.41"
    srv = make_server('default_domain = "test.com"\n'
                      "[submission]\nauth_plaintext_loopback = true\n")
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
    srv.start()
    def enough():
        text = log_text(srv)
        both = (f"smtp: auth failed: rip={ip} " in text and
                f"pop3: login failed: rip={ip} " in text)
        return both and len(failure_times(text, ip)) >= len(ONE_CONNECTION_SCHEDULE) and text
    with Guessers(srv, ip, smtp=True):
        text = wait_for(enough, timeout=90, what="failed checks over both protocols")
    assert f"smtp: auth failed: rip={ip} " in text and f"pop3: login failed: rip={ip} " in text
    times = failure_times(text, ip)
    offsets = [t - times[0] for t in times]
    for k, earliest in enumerate(ONE_CONNECTION_SCHEDULE):
        assert offsets[k] >= earliest, offsets
    within = [o for o in offsets if o < ONE_CONNECTION_SCHEDULE[-1]]
    assert len(within) <= len(ONE_CONNECTION_SCHEDULE) - 1, offsets


# --- descriptors: a flood on one service ---------------------------------------------------------

# The server's open-file limit in this test: the 256, where 300 POP3 connections from
# one address took every descriptor and SMTP from another address got no greeting.
LOWERED_NOFILE = 256
FLOOD_CONNECTIONS = 300


def test_pop3_descriptor_flood_leaves_smtp_and_admin_working(make_server):
    """300 POP3 connections from one address against a server limited to 256 descriptors, with
    POP3's own limits set out of the way: POP3 gets its share of what the reserve leaves
    (descriptors.py) and refuses the rest with -ERR [SYS/TEMP]; SMTP from another address still
    greets, the admin socket still answers, a message is still queued and delivered, and
    nothing in the log says EMFILE."""
    from tests.integration.opstools import admin

    def lower_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (LOWERED_NOFILE, LOWERED_NOFILE))

    srv = make_server('default_domain = "test.com"\n'
                      '[pop3]\nmax_per_ip = 1000\nmax_connections = 1000\n',
                      preexec_fn=lower_nofile)
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
    srv.start()
    flood_sockets = []
    greetings = []
    try:
        for _ in range(FLOOD_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", srv.port("pop3")), timeout=IO_TIMEOUT,
                                         source_address=("127.0.0.1", 0))
            flood_sockets.append(s)
        greetings = [read_line(s) for s in flood_sockets]
        open_now = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        assert open_now < LOWERED_NOFILE - 64, open_now       # the reserve is still there
        smtp = socket.create_connection(("127.0.0.1", srv.port("smtp")), timeout=IO_TIMEOUT,
                                        source_address=("127.0.0.2", 0))
        with smtp:
            assert read_line(smtp).startswith(b"220 ")
        ok, lines = admin(srv, "stat\n")[0]
        assert ok, lines
        # The queue's own files: a message is accepted (queue file, fsync, commit) and
        # delivered (Maildir tmp/ and new/) while the flood still holds its connections.
        with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=IO_TIMEOUT,
                          source_address=("127.0.0.3", 0)) as c:
            c.sendmail("a@example.org", ["test@test.com"],
                       b"Subject: during the flood\r\n\r\nstill delivered\r\n")
        new = srv.data / "domains" / "test.com" / "test" / "Maildir" / "new"
        wait_for(lambda: any(b"still delivered" in f.read_bytes() for f in new.iterdir()),
                 what="delivery during the flood")
    finally:
        for s in flood_sockets:
            s.close()
    admitted = [g for g in greetings if g.startswith(b"+OK ")]
    refused = [g for g in greetings if g == b"-ERR [SYS/TEMP] server out of connection slots,"
                                             b" try again later\r\n"]
    assert len(admitted) + len(refused) == FLOOD_CONNECTIONS, set(greetings) - set(admitted)
    assert 0 < len(admitted) < LOWERED_NOFILE // 2 and refused
    log = wait_for_log(srv, "descriptors: limit 256, reserve ")
    assert "EMFILE" not in log and "Too many open files" not in log
    assert ("pop3: connection refused: rip=127.0.0.1 port=pop3: -ERR [SYS/TEMP] server out of"
            " connection slots") in log


# --- time: a client that trickles --------------------------------------------------------------

# [smtp] timeout for this test: each command line must be complete within 2 s of the last one.
SHORT_TIMEOUT = 2
TRICKLE_PACE = 0.5            # seconds between the trickler's bytes
TRICKLE_BYTES = 40            # 20 s of trickling: ten times the deadline


def test_trickling_client_is_cut_off_at_the_request_deadline(make_server):
    """One byte every half second, never a line end: the server answers 451 timeout and closes
    long before the trickle ends, because bytes that do not complete a command earn no time
    (deadline.py). Before issue 18 every byte restarted the timer and the trickler stayed."""
    srv = make_server(f"[smtp]\ntimeout = {SHORT_TIMEOUT}\n")
    srv.start()
    s = socket.create_connection(("127.0.0.1", srv.port("smtp")), timeout=IO_TIMEOUT)
    with s:
        assert read_line(s).startswith(b"220 ")
        s.sendall(b"HELO trickle.example\r\n")
        assert read_line(s).startswith(b"250 ")
        sent = 0
        answer = b""
        for byte in b"NOOP " + b"x" * (TRICKLE_BYTES - 5):
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break                    # closed under us
            sent += 1
            readable, _, _ = select.select([s], [], [], TRICKLE_PACE)   # the pace, or an answer
            if readable:
                answer = read_line(s)
                break
    assert answer == b"451 timeout (#4.4.2)\r\n", (answer, sent)
    assert sent < TRICKLE_BYTES
    wait_for_log(srv, "timeout: rip=127.0.0.1")


def test_pop3s_client_that_never_reads_costs_bounded_memory(make_server, tmp_path):
    """The same over implicit TLS (pop3s): the TLS layer passes the pause through, so a client
    that never reads costs the same bounded memory (before issue 18, POP3 had no bound at all
    under TLS)."""
    import ssl
    from tests.integration.test_pop3_server import start_with_user, tls_config
    from tests.pop3_support import make_cert
    cert, key = make_cert(tmp_path / "tls")
    srv = start_with_user(make_server(tls_config(cert, key)))
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    raw = non_reading_client(srv.port("pop3s"))
    s = ctx.wrap_socket(raw)
    try:
        read_line(s)
        for line in (b"USER test@test.com\r\n", f"PASS {PASSWORD}\r\n".encode(), b"STAT\r\n"):
            s.sendall(line)
            read_line(s)
        before = rss(srv.proc.pid)
        s.setblocking(False)
        chunk = b"STAT\r\n" * (16384 // 6)
        sent = 0
        while sent < POP3_FLOOD_BYTES:
            _, writable, _ = select.select([], [s], [], STALL_SECONDS)
            if not writable:
                break
            try:
                sent += s.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                continue
        growth = rss(srv.proc.pid) - before
        print(f"pop3s STAT: sent {sent} bytes, server RSS +{growth}")
    finally:
        raw.close()
    assert growth < RSS_GROWTH_BOUND, (growth, sent)
    assert sent < POP3_FLOOD_BYTES, "the server read everything: no flow control"
