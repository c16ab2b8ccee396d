"""Content scanning through the real server (`twistd -n mailappliance` on loopback) with the
real daemons: a private clamd and rspamd (tests/scanners.py, once per session), and
tests/scanners.py's ScannerProxy where a scanner must hang. Real clients: smtplib and a raw
socket for pipelining."""

from __future__ import annotations

import email.policy
import smtplib
import socket
import struct
import time
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from mailappliance.testing.scanners import EICAR, SPAM_TOKEN
from tests.integration.delivery_support import maildir_files, queue_ids, wait_until
from tests.integration.opstools import log_text, wait_for_log
from tests.scanners import ClamdDaemon, ScannerProxy

pytestmark = pytest.mark.integration

# Bound on one reply from the server in these tests (a scan with the test database takes
# milliseconds; the bound covers a loaded CI machine).
REPLY_WAIT = 30.0


def make(make_server, scan: str, extra: str = ""):
    srv = make_server(f'default_domain = "test.com"\n{extra}\n[scan]\n{scan}\n')
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    return srv.start()


def eicar_attachment(sender: str = "a@example.org") -> bytes:
    m = MIMEMultipart()
    m["From"], m["To"], m["Subject"] = sender, "test@test.com", "attached"
    m["Message-ID"] = "<eicar-1@example.org>"
    m.attach(MIMEText("see the attachment\n"))
    m.attach(MIMEApplication(EICAR, Name="eicar.com"))
    return m.as_bytes(policy=email.policy.SMTP)             # CRLF line ends


def clean(tag: str, sender: str = "a@example.org") -> bytes:
    return (f"From: {sender}\r\nTo: test@test.com\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.org>\r\n\r\nclean body {tag}\r\n").encode()


def send(srv, message: bytes, port_kind: str = "smtp", login: bool = False):
    with smtplib.SMTP("127.0.0.1", srv.port(port_kind), timeout=REPLY_WAIT) as s:
        if login:
            s.ehlo()
            s.login("test@test.com", "Passw0rd!")
        return s.sendmail("a@example.org" if not login else "test@test.com",
                          ["test@test.com"], message)


class Raw:
    """A line-level SMTP client on a plain socket, for pipelining and half-finished sessions."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_WAIT)
        self.buf = b""
        assert self.reply().startswith("220")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One complete reply (the last line of a multi-line one)."""
        while True:
            while b"\r\n" in self.buf:
                line, self.buf = self.buf.split(b"\r\n", 1)
                if line[3:4] == b" ":
                    return line.decode()
            got = self.sock.recv(65536)
            if not got:
                raise ConnectionError("server closed the connection")
            self.buf += got

    def pending(self) -> bool:
        """Has the server said anything not read yet? (does not wait)"""
        self.sock.setblocking(False)
        try:
            got = self.sock.recv(65536)
            if got:
                self.buf += got
            return bool(self.buf) or got == b""
        except BlockingIOError:
            return bool(self.buf)
        finally:
            self.sock.setblocking(True)
            self.sock.settimeout(REPLY_WAIT)

    def close(self) -> None:
        self.sock.close()


def test_eicar_is_refused_with_554_and_nothing_stored_clean_mail_is_delivered_scanned(
        make_server, clamd_daemon, rspamd_daemon):
    srv = make(make_server, f'clamd = "{clamd_daemon.endpoint}"\n'
                            f'spam = "{rspamd_daemon.endpoint}"\n',
               extra="[submission]\nauth_plaintext_loopback = true\n")
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(srv, eicar_attachment())
    assert e.value.smtp_code == 554
    text = e.value.smtp_error.decode()
    assert text.startswith("5.7.0 sorry, your message contains a virus (Eicar-Test-")
    assert send(srv, clean("ok-1")) == {}
    files = wait_until(lambda: maildir_files(srv), what="the clean message's delivery")
    assert len(files) == 1
    delivered = files[0].read_bytes()
    head = delivered.split(b"\n\n", 1)[0]
    assert b"X-Virus-Scanned: clean (clamd) on mx.test.example\n" in head
    assert b"\nX-Spam-Status: No, score=0.0 " in head
    assert head.index(b"X-Virus-Scanned") < head.index(b"Received: from") < \
        head.index(b"Subject: ok-1")                          # on top, as end-of-data fields go
    # Spam from the internet is refused; the same text from a logged-in user is not scored,
    # but a virus from a logged-in user is still refused.
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(srv, clean("spam") + b"buy " + SPAM_TOKEN + b"\r\n")
    assert e.value.smtp_code == 550 and b"5.7.1" in e.value.smtp_error
    user = "test@test.com"
    assert send(srv, clean("user", user) + SPAM_TOKEN + b"\r\n", "submission", login=True) == {}
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(srv, eicar_attachment(user), "submission", login=True)
    assert e.value.smtp_code == 554
    files = wait_until(lambda: len(maildir_files(srv)) == 2 and maildir_files(srv),
                       what="the user's message")
    user_msg = [f.read_bytes() for f in files if b"Subject: user" in f.read_bytes()][0]
    assert b"X-Virus-Scanned: clean" in user_msg and b"X-Spam" not in user_msg
    wait_until(lambda: queue_ids(srv) == [], what="an empty queue")
    queue = srv.data / "queue"
    left = [p for p in queue.rglob("*") if p.is_file()]    # free/ keeps delivered files
    assert [p for p in left if p.relative_to(queue).parts[0] == "tmp"] == []
    assert not any(b"<eicar-1@example.org>" in p.read_bytes() for p in left)  # refused: gone
    log = wait_for_log(srv, "message-id <eicar-1@example.org>: virus Eicar-Test-")
    assert "scan: 127.0.0.1 message-id <eicar-1@example.org>: virus" in log
    assert "scan: clamd available" in log and "scan: rspamd available" in log


def test_pipelined_commands_behind_a_scanned_message_get_their_replies_in_order(
        make_server, clamd_daemon):
    srv = make(make_server, f'clamd = "{clamd_daemon.endpoint}"\n')
    c = Raw(srv.port("smtp"))
    c.send(b"EHLO client.example\r\n")
    c.reply()
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<test@test.com>\r\nDATA\r\n")
    assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    virus = eicar_attachment()
    # The message, its dot, and the next transaction in one write: the verdict is pending
    # while the next commands are already in the server's hands.
    c.send(virus + b"\r\n.\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<test@test.com>\r\n"
           b"NOOP\r\nDATA\r\n")
    replies = [c.reply() for _ in range(4)]
    assert [r[:3] for r in replies] == ["554", "250", "250", "250"]
    assert c.reply().startswith("354")
    c.send(clean("after") + b".\r\n")
    assert c.reply().startswith("250 2.0.0 ok")
    c.close()
    assert len(wait_until(lambda: maildir_files(srv), what="delivery")) == 1


def held_in_scan(srv, hang: ScannerProxy, name: str) -> Raw:
    """A session whose message `name` the hanging scanner behind `hang` has got whole."""
    a = Raw(srv.port("smtp"))
    a.send(b"HELO a\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<test@test.com>\r\nDATA\r\n")
    assert [a.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    a.send(clean(name) + b".\r\n")
    wait_until(lambda: hang.held >= len(clean(name)), what="the scanner to get the message")
    return a


def test_a_hanging_scanner_tempfails_within_the_timeout_and_other_sessions_go_on(make_server):
    hang = ScannerProxy()                                   # accepts, never answers
    try:
        srv = make(make_server, f'clamd = "{hang.endpoint}"\ntimeout = 3\n')
        started = time.monotonic()
        a = held_in_scan(srv, hang, "hang")
        # Another session, meanwhile: every reply comes while A still waits for its verdict.
        b = Raw(srv.port("smtp"))
        b.send(b"HELO b\r\n")
        assert b.reply().startswith("250")
        b.send(b"MAIL FROM:<b@example.org>\r\n")
        assert b.reply().startswith("250")
        b.send(b"RCPT TO:<test@test.com>\r\n")
        assert b.reply().startswith("250")
        b.send(b"QUIT\r\n")
        assert b.reply().startswith("221")
        assert not a.pending(), "A got its reply before B was done"
        reply = a.reply()
        assert reply.startswith("451 sorry, the content scanner is unavailable")
        assert time.monotonic() - started >= 3.0
        a.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<test@test.com>\r\nDATA\r\n")
        assert [a.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
        a.send(clean("hang2") + b".\r\n")
        assert a.reply().startswith("451")
        a.close()
        assert queue_ids(srv) == [] and maildir_files(srv) == []
        log = wait_for_log(srv, "scan: clamd unavailable: no answer within 3 s")
        assert log.count("scan: clamd unavailable") == 1    # once, not per message
    finally:
        hang.close()


def test_a_client_whose_connection_breaks_mid_scan_stops_its_scan(make_server):
    """A reset connection: nobody waits for the verdict any more, so the scanner's connection
    is closed at once (its work stopped), not held until the answer or the timeout; nothing
    is queued. (A client that only closes its sending side may still be reading: it is
    answered as usual.)"""
    hang = ScannerProxy()                                   # accepts, never answers
    try:
        srv = make(make_server, f'clamd = "{hang.endpoint}"\ntimeout = 60\n')
        a = held_in_scan(srv, hang, "leaving")
        before = len(hang.clients)           # the scan's connection (and a health probe's)
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()                             # linger 0: a reset, as a crashed peer's
        wait_until(lambda: len(hang.clients) < before, timeout=5,
                   what="the scan connection to close")
        log = wait_for_log(srv, "client gone during the end-of-data checks: rip=127.0.0.1; "
                                "checks stopped, nothing queued")
        assert "unavailable" not in log and "failed" not in log   # not a scanner outage
        assert queue_ids(srv) == [] and maildir_files(srv) == []
    finally:
        hang.close()


def test_kill_9_during_a_scan_loses_nothing_acknowledged(make_server, tmp_path):
    daemon = ClamdDaemon(tmp_path / "clamd").start()
    proxy = ScannerProxy(target=str(daemon.socket), hold=False)
    try:
        srv = make(make_server, f'clamd = "{proxy.endpoint}"\n')
        assert send(srv, clean("acked")) == {}               # acknowledged before the crash
        proxy.hold = True                                    # the next scan never answers
        c = Raw(srv.port("smtp"))
        c.send(b"HELO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<test@test.com>\r\nDATA\r\n")
        assert [c.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
        c.send(clean("in-scan") + b".\r\n")
        wait_until(lambda: proxy.held >= len(clean("in-scan")), what="the scan to be under way")
        srv.kill()
        with pytest.raises((ConnectionError, OSError)):
            c.reply()                                        # no 250 ever came
        c.close()
        proxy.hold = False
        srv.start()
        wait_until(lambda: queue_ids(srv) == [] and maildir_files(srv),
                   what="the queue to empty after the restart")
        bodies = [f.read_bytes() for f in maildir_files(srv)]
        assert sum(b"clean body acked" in b for b in bodies) == 1
        assert not any(b"clean body in-scan" in b for b in bodies)
        assert send(srv, clean("after")) == {}              # scanning works after the restart
        wait_until(lambda: len(maildir_files(srv)) == 2, what="the last delivery")
        assert "scan: clamd available" in log_text(srv)
    finally:
        proxy.close()
        daemon.cleanup()


def test_clamd_killed_and_restarted_the_server_accepts_again_without_a_restart(
        make_server, tmp_path):
    """clamd dies with connections we keep between scans: mail gets 451 while it is down,
    the outage is logged once, and once clamd is back mail is scanned and accepted again by
    the same server process, its recovery logged once."""
    daemon = ClamdDaemon(tmp_path / "clamd").start()
    try:
        srv = make(make_server, f'clamd = "{daemon.endpoint}"\n')
        pid = srv.proc.pid
        for i in range(3):                                   # connections are kept now
            assert send(srv, clean(f"before-{i}")) == {}
        daemon.kill()
        for i in range(2):
            with pytest.raises(smtplib.SMTPDataError) as e:
                send(srv, clean(f"down-{i}"))
            assert e.value.smtp_code == 451
        daemon.start()
        assert send(srv, clean("after")) == {}
        with pytest.raises(smtplib.SMTPDataError) as e:
            send(srv, eicar_attachment())
        assert e.value.smtp_code == 554
        assert srv.proc.pid == pid                           # the same server throughout
        files = wait_until(lambda: len(maildir_files(srv)) == 4 and maildir_files(srv),
                           what="the four clean messages' delivery")
        bodies = b"".join(f.read_bytes() for f in files)
        assert b"clean body after" in bodies and b"clean body down-" not in bodies
        log = wait_for_log(srv, "scan: clamd available again after")
        assert log.count("scan: clamd unavailable") == 1
        assert log.count("scan: clamd available again after") == 1
        assert "2 messages tempfailed meanwhile" in log
    finally:
        daemon.cleanup()
