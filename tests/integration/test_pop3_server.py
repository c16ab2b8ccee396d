"""POP3 against the real `twistd -n mailappliance` on loopback, with poplib and raw sockets:
the seed transcript (delivery, login, LIST, then POP-before-SMTP relay from that IP only),
STLS and pop3s with certificate checking, qmail-pop3d semantics on disk, the mailbox lock,
failed-login delay and log line, grants surviving a restart."""

from __future__ import annotations

import os
import poplib
import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.integration.opstools import wait_for_log
from tests.pop3_support import deliver, make_cert, message

pytestmark = pytest.mark.integration

PASSWORD = "Passw0rd!"
IO_TIMEOUT = 20
# Bound on waiting for a message to travel SMTP -> queue -> Maildir on a loaded 2-core box.
DELIVERY_TIMEOUT = 30.0


class POP3From(poplib.POP3):
    """poplib.POP3 connecting from a chosen 127.0.0.N (each address is its own client)."""

    def __init__(self, host, port, source_ip="127.0.0.1", timeout=IO_TIMEOUT):
        self.source_ip = source_ip
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source_ip, 0))


def tls_config(cert: Path, key: Path, extra: str = "") -> str:
    return (f'default_domain = "test.com"\n{extra}\n'
            f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
            "[listen]\n"
            'smtp = ["tcp:0:interface=127.0.0.1"]\n'
            'submission = ["tcp:0:interface=127.0.0.1"]\n'
            'pop3 = ["tcp:0:interface=127.0.0.1"]\n'
            'pop3s = ["tcp:0:interface=127.0.0.1"]\n')


def start_with_user(srv):
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
    return srv.start()


@pytest.fixture
def certs(tmp_path):
    return make_cert(tmp_path / "tls")


@pytest.fixture
def tls_server(make_server, certs):
    return start_with_user(make_server(tls_config(*certs)))


def maildir(srv) -> Path:
    return srv.data / "domains" / "test.com" / "test" / "Maildir"


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def wait_for_messages(md: Path, count: int) -> list[str]:
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while time.monotonic() < deadline:
        names = os.listdir(md / "new") + os.listdir(md / "cur")
        if len(names) >= count:
            return names
        time.sleep(0.05)
    raise AssertionError(f"{count} message(s) not delivered to {md} in {DELIVERY_TIMEOUT}s")


def relay_reply(srv, ip: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), source_address=(ip, 0),
                      timeout=IO_TIMEOUT) as s:
        s.ehlo("client.example")
        assert s.mail("roamer@test.com")[0] == 250
        code, text = s.rcpt("friend@elsewhere.example")
        s.rset()
        return code, text


def test_seed_transcript_delivery_login_list_then_roaming_relay(server):
    # 1. A message arrives the ordinary way: SMTP, queue, local delivery into the Maildir.
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), source_address=("127.0.0.3", 0),
                      timeout=IO_TIMEOUT) as s:
        s.sendmail("friend@elsewhere.example", ["test@test.com"],
                   b"From: friend@elsewhere.example\r\nTo: test@test.com\r\n"
                   b"Subject: seed transcript\r\n\r\nhello over POP3\r\n")
    wait_for_messages(maildir(server), 1)
    # Before any POP3 login nobody relays.
    assert relay_reply(server, "127.0.0.5")[0] == 553
    # 2. The user logs in over POP3 from 127.0.0.5 and sees the message.
    p = POP3From("127.0.0.1", server.port("pop3"), "127.0.0.5")
    assert p.getwelcome() == b"+OK mx.test.example POP3 server ready"   # no APOP <timestamp>
    assert p.user("test") == b"+OK"
    assert p.pass_(PASSWORD).startswith(b"+OK maildrop has 1 messages")
    resp, listing, _ = p.list()
    assert len(listing) == 1 and listing[0].startswith(b"1 ")
    lines = p.retr(1)[1]
    assert b"Subject: seed transcript" in lines and b"hello over POP3" in lines
    p.quit()
    # 3. Roaming user: relay is accepted from that same address, and only from it.
    code, text = relay_reply(server, "127.0.0.5")
    assert code == 250, text
    code, text = relay_reply(server, "127.0.0.6")
    assert code == 553 and b"allowed rcpthosts" in text


def test_failed_login_grants_nothing_waits_and_is_logged(server):
    """A wrong password and an unknown user, from two addresses at once: the same answer after
    the same first penalty step (its later steps are timed with a clock in
    tests/adapters/test_pop3_protocol.py), no relay grant, one log line each."""
    from concurrent.futures import ThreadPoolExecutor

    def fail(ip: str, user: str, password: str) -> float:
        p = POP3From("127.0.0.1", server.port("pop3"), ip)
        assert p.user(user) == b"+OK"
        start = time.monotonic()
        with pytest.raises(poplib.error_proto, match="authorization failed"):
            p.pass_(password)
        waited = time.monotonic() - start
        p.quit()
        return waited

    with ThreadPoolExecutor(2) as pool:
        waits = list(pool.map(fail, ("127.0.0.7", "127.0.0.8"), ("test", "nosuchuser"),
                              ("wrong-Passw0rd!", "whatever-1")))
    assert min(waits) >= 1.9, waits
    assert relay_reply(server, "127.0.0.7")[0] == 553
    log = wait_for_log(server, "pop3: login failed: rip=127.0.0.7 user=<test> tls=no delay=2s",
                       "pop3: login failed: rip=127.0.0.8 user=<nosuchuser> tls=no delay=2s")
    assert "wrong-Passw0rd!" not in log and "whatever-1" not in log


def test_stls_with_certificate_check_and_login(tls_server, certs):
    deliver(maildir(tls_server), message(1))
    p = POP3From("127.0.0.1", tls_server.port("pop3"), "127.0.0.11")
    caps = p.capa()
    assert "STLS" in caps and "USER" in caps and "APOP" not in caps
    assert p.stls(client_context(certs[0])).startswith(b"+OK")
    assert p.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert "STLS" not in p.capa()
    p.user("test@test.com")
    p.pass_(PASSWORD)
    assert p.stat() == (1, len(message(1)))
    assert p.retr(1)[1][2] == b"Subject: message 1"
    p.quit()
    wait_for_log(tls_server,
                 "pop3: login ok: rip=127.0.0.11 user=<test@test.com> tls=yes messages=1")


def test_pop3s_implicit_tls(tls_server, certs):
    deliver(maildir(tls_server), message(2))
    s = poplib.POP3_SSL("127.0.0.1", tls_server.port("pop3s"), timeout=IO_TIMEOUT,
                        context=client_context(certs[0]))
    assert s.getwelcome() == b"+OK mx.test.example POP3 server ready"
    assert "STLS" not in s.capa()
    s.user("test%test.com")
    s.pass_(PASSWORD)
    assert s.uidl()[1][0].split()[1].decode() == os.listdir(maildir(tls_server) / "new")[0]
    s.quit()


def test_tls_below_1_2_is_refused_on_pop3s(tls_server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        poplib.POP3_SSL("127.0.0.1", tls_server.port("pop3s"), timeout=IO_TIMEOUT, context=ctx)


def test_require_tls_refuses_plaintext_until_stls(make_server, certs):
    srv = start_with_user(make_server(tls_config(*certs, extra="[pop3]\nrequire_tls = true\n")))
    p = POP3From("127.0.0.1", srv.port("pop3"), "127.0.0.12")
    assert "USER" not in p.capa()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] plaintext login disallowed"):
        p.user("test")
    p.stls(client_context(certs[0]))
    assert "USER" in p.capa()
    p.user("test")
    assert p.pass_(PASSWORD).startswith(b"+OK")
    p.quit()


def test_qmail_pop3d_semantics_on_disk(server):
    md = maildir(server)
    names = [deliver(md, message(i), mtime=1_700_000_000 + i) for i in range(4)]
    # A session that marks everything and then drops the connection deletes nothing.
    p = POP3From("127.0.0.1", server.port("pop3"), "127.0.0.13")
    p.user("test")
    p.pass_(PASSWORD)
    for i in range(1, 5):
        p.dele(i)
    p.sock.close()
    deadline = time.monotonic() + IO_TIMEOUT
    # The server notices the drop and releases the lock; then a new session sees all four.
    while True:
        try:
            p = POP3From("127.0.0.1", server.port("pop3"), "127.0.0.13")
            p.user("test")
            p.pass_(PASSWORD)
            break
        except poplib.error_proto as e:
            assert b"IN-USE" in e.args[0] and time.monotonic() < deadline
            p.close()
            time.sleep(0.05)
    assert p.stat()[0] == 4
    assert [line.split()[1].decode() for line in p.uidl()[1]] == names    # delivery order
    with pytest.raises(poplib.error_proto, match="no such message"):
        p.retr(0)
    with pytest.raises(poplib.error_proto, match="invalid message number"):
        p._shortcmd("RETR -1")
    with pytest.raises(poplib.error_proto, match="too many arguments"):
        p._shortcmd("DELE 1 2")
    p.dele(2)
    with pytest.raises(poplib.error_proto, match="already deleted"):
        p.retr(2)
    p.rset()
    p.dele(1)
    p.dele(3)
    assert sorted(os.listdir(md / "new")) == sorted(names)     # nothing before QUIT
    assert p.quit() == b"+OK signing off"
    assert os.listdir(md / "new") == []
    assert sorted(os.listdir(md / "cur")) == sorted([names[1] + ":2,", names[3] + ":2,"])
    # UIDLs survive the move to cur/.
    p = POP3From("127.0.0.1", server.port("pop3"), "127.0.0.13")
    p.user("test")
    p.pass_(PASSWORD)
    assert [line.split()[1].decode() for line in p.uidl()[1]] == [names[1], names[3]]
    p.quit()


def test_concurrent_sessions_on_one_mailbox(server):
    deliver(maildir(server), message(1))
    first = POP3From("127.0.0.1", server.port("pop3"), "127.0.0.14")
    first.user("test")
    first.pass_(PASSWORD)
    second = POP3From("127.0.0.1", server.port("pop3"), "127.0.0.15")
    second.user("test")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(PASSWORD)
    first.dele(1)
    first.quit()
    second.user("test")
    assert second.pass_(PASSWORD).startswith(b"+OK maildrop has 0 messages")
    second.quit()


def peak_rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_50_mb_message_streams_with_bounded_memory(server):
    """RETR of a 50 MB message: the server's peak RSS grows by far less than the message."""
    import hashlib
    size = 50 * 1024 * 1024
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz.\n"
    content = b"Subject: big\n\n" + b".starts with a dot\n" + line * (size // len(line))
    deliver(maildir(server), content)
    expected = hashlib.sha256(content.replace(b"\n", b"\r\n").replace(b"\n.", b"\n..")
                              + b".\r\n").hexdigest()
    pid = server.proc.pid
    with socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=IO_TIMEOUT,
                                  source_address=("127.0.0.16", 0)) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"USER test\r\nPASS " + PASSWORD.encode() + b"\r\n")
        f.readline(), f.readline()
        before = peak_rss_kib(pid)
        s.sendall(b"RETR 1\r\n")
        assert f.readline() == b"+OK %d octets\r\n" % len(content)
        digest = hashlib.sha256()
        tail = b""
        deadline = time.monotonic() + 120
        while not tail.endswith(b"\r\n.\r\n") and time.monotonic() < deadline:
            chunk = f.read1(1 << 20)
            assert chunk, "connection closed mid-message"
            digest.update(chunk)
            tail = (tail + chunk)[-5:]
        grown = peak_rss_kib(pid) - before
        s.sendall(b"QUIT\r\n")
    assert digest.hexdigest() == expected
    assert grown < 20 * 1024, f"server peak RSS grew by {grown} KiB for a 50 MB message"


def test_ten_thousand_messages_list_without_reading_bodies(server):
    """10,000 sparse files of 20 MB each (200 GB apparent): LIST and STAT answer quickly and
    the server's memory does not grow with the bodies."""
    md = maildir(server)
    big = 20 * 1024 * 1024
    t = 1_700_000_000
    for i in range(10_000):
        with open(md / "new" / f"{t + i}.M{i}P1.test.example", "wb") as f:
            f.truncate(big)
    pid = server.proc.pid
    before = peak_rss_kib(pid)
    p = POP3From("127.0.0.1", server.port("pop3"), "127.0.0.20", timeout=120)
    p.user("test")
    assert p.pass_(PASSWORD).startswith(b"+OK maildrop has 10000 messages")
    resp, listing, _ = p.list()
    assert len(listing) == 10_000 and listing[-1] == b"10000 %d" % big
    assert p.stat() == (10_000, 10_000 * big)
    assert len(p.uidl()[1]) == 10_000
    p.quit()
    assert peak_rss_kib(pid) - before < 64 * 1024


def test_pipelined_commands_over_a_raw_socket(server):
    md = maildir(server)
    for i in range(20):
        deliver(md, message(i, 2048), mtime=1_700_000_000 + i)
    with socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=IO_TIMEOUT,
                                  source_address=("127.0.0.17", 0)) as s:
        s.sendall(b"USER test\r\nPASS " + PASSWORD.encode() + b"\r\n" +
                  b"".join(b"RETR %d\r\n" % i for i in range(1, 21)) + b"QUIT\r\n")
        data = b""
        deadline = time.monotonic() + IO_TIMEOUT
        while not data.endswith(b"+OK signing off\r\n") and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.count(b"\r\n.\r\n") == 20 and data.endswith(b"+OK signing off\r\n")


def test_grant_survives_a_restart(make_server):
    srv = make_server('default_domain = "test.com"\n[pop3]\nroaming_relay_minutes = 5\n')
    start_with_user(srv)
    p = POP3From("127.0.0.1", srv.port("pop3"), "127.0.0.18")
    p.user("test")
    p.pass_(PASSWORD)
    p.quit()
    assert relay_reply(srv, "127.0.0.18")[0] == 250
    srv.stop()
    srv.start()
    assert relay_reply(srv, "127.0.0.18")[0] == 250
    assert relay_reply(srv, "127.0.0.19")[0] == 553


def test_big_and_pipelined_retrieval_over_tls(tls_server, certs):
    """The streaming producer and the output gate also work through the TLS layer."""
    md = maildir(tls_server)
    big = message(0, 3 * 1024 * 1024 + 5)
    deliver(md, big, mtime=1_700_000_000)
    small = [message(i, 8000) for i in range(1, 61)]
    for i, c in enumerate(small):
        deliver(md, c, mtime=1_700_000_001 + i)
    ctx = client_context(certs[0])
    with socket.create_connection(("127.0.0.1", tls_server.port("pop3s")),
                                  timeout=IO_TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="mx.test.example") as s:
            s.sendall(b"USER test\r\nPASS " + PASSWORD.encode() + b"\r\n" +
                      b"".join(b"RETR %d\r\n" % i for i in range(1, 62)) + b"QUIT\r\n")
            data = bytearray()
            deadline = time.monotonic() + 60
            while not data.endswith(b"+OK signing off\r\n") and time.monotonic() < deadline:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
    assert data.endswith(b"+OK signing off\r\n")
    bodies = bytes(data).split(b"\r\n.\r\n")
    assert len(bodies) == 62                      # 61 messages + the QUIT reply after them
    assert bodies[0].endswith(big.replace(b"\n", b"\r\n")[:-2])
    for got, want in zip(bodies[1:61], small):
        assert got.endswith(want.replace(b"\n", b"\r\n")[:-2])
