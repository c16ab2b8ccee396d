"""The SMTP receiver end to end: the real `twistd -n mailappliance` on loopback, real clients
(smtplib, raw sockets, swaks), each 127.0.0.N a client of its own with its own rules line.

One server serves most cases; the rules file gives each source address its story.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool

RULES = """\
127.0.0.4:allow,RELAYCLIENT=""
127.0.0.9:allow,GREETDELAY="1"
127.0.0.10:deny
:allow
"""

# Every network wait in this file is bounded by this.
IO_TIMEOUT = 10.0
MARKER = "mailappliance-integration-marker"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from tests.integration.server import ServerProcess
    root = tmp_path_factory.mktemp("smtp-server")
    rules = root / "tcp.smtp"
    rules.write_text(RULES)
    config = (f'default_domain = "test.com"\n'
              f"[smtp]\nrules = \"{rules}\"\nmax_per_ip = 3\ndatabytes = 100000\n"
              f"max_recipients = 5\ntimeout = 30\n"
              # Nothing may leave the machine: every remote domain routes to a closed local port.
              f'[routes]\n"" = "127.0.0.1:9"\n')
    s = ServerProcess(root, config)
    s.root.mkdir(parents=True, exist_ok=True)
    s._write_config()
    s.cli("domain", "add", "test.com")
    s.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    s.start()
    yield s
    s.stop()


def smtp(srv, ip="127.0.0.2") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", srv.port("smtp"), source_address=(ip, 0),
                        timeout=IO_TIMEOUT)


class Raw:
    """A raw socket client that reads replies line by line with a deadline."""

    def __init__(self, srv, ip="127.0.0.2", kind="smtp"):
        self.sock = socket.create_connection(("127.0.0.1", srv.port(kind)), timeout=IO_TIMEOUT,
                                             source_address=(ip, 0))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One complete (possibly multi-line) reply; '' at EOF."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return "".join(lines)
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode() + "\r\n")
            if line[3:4] != b"-":
                return "".join(lines)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def message_bytes(srv, marker: str) -> bytes:
    """The content of a file that holds `marker`, read in the same pass that found it (the
    queue manager may deliver and remove the queue file at any moment); b"" if none."""
    for _path, data in _walk_messages(srv, marker):
        return data
    return b""


def find_message(srv, marker: str) -> list[Path]:
    """Files under the queue or the mailboxes that hold `marker` (the message is on disk)."""
    return [path for path, _ in _walk_messages(srv, marker)]


def _walk_messages(srv, marker: str):
    for top in (srv.data / "queue", srv.data / "domains"):
        for dirpath, _, files in os.walk(top):
            for name in files:
                p = Path(dirpath) / name
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                if marker.encode() in data:
                    yield p, data


# --- smtplib ----------------------------------------------------------------------------------

def test_smtplib_message_to_local_user_is_on_disk_after_250(srv):
    marker = f"{MARKER}-{time.monotonic_ns()}"
    with smtp(srv, "127.0.0.2") as s:
        code, text = s.ehlo("client.example")
        assert code == 250
        for ext in ("pipelining", "8bitmime", "size", "enhancedstatuscodes"):
            assert s.has_extn(ext), ext
        assert s.esmtp_features["size"] == "100000"
        refused = s.sendmail("bob@remote.example", ["test@test.com"],
                             f"Subject: integration\r\n\r\n{marker}\r\n.dotted line\r\n")
        assert refused == {}
        code, text = s.noop()
        assert code == 250
    data = message_bytes(srv, marker)
    assert data, "accepted message not found on disk"
    assert b"(HELO client.example) (127.0.0.2)" in data
    assert f"by {srv.hostname} with ESMTP".encode() in data
    assert b"\n.dotted line\n" in data and b"\r\n" not in data.split(marker.encode())[1][:20]


def test_relay_is_refused_without_permission_from_every_loopback_address(srv):
    for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        with smtp(srv, ip) as s:
            s.ehlo("c")
            s.mail("a@b.example")
            code, text = s.rcpt("victim@remote.example")
            assert (code, text) == (
                553, b"5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")


def test_relayclient_rule_allows_relay_for_that_address_only(srv):
    with smtp(srv, "127.0.0.4") as s:
        s.ehlo("c")
        s.mail("a@b.example")
        assert s.rcpt("friend@remote.example")[0] == 250
        s.rset()


@pytest.mark.parametrize("rcpt", [
    "victim%remote.example@test.com", "remote.example!victim@test.com",
    '"victim@remote.example"@test.com', "@test.com:victim@remote.example",
    "victim@[127.0.0.1]", "victim@remote.example.", "VICTIM@REMOTE.EXAMPLE",
    "victim%remote.example@[127.0.0.1]",
])
def test_relay_tricks_are_refused(srv, rcpt):
    r = Raw(srv, "127.0.0.3")
    assert r.reply().startswith("220 ")
    r.send(b"HELO c\r\nMAIL FROM:<test@test.com>\r\nRCPT TO:<" + rcpt.encode() + b">\r\n")
    assert r.reply().startswith("250 ") and r.reply().startswith("250 ")
    assert r.reply()[:3] in ("550", "553")
    r.close()


def test_unknown_local_user_is_550_and_vrfy_reveals_nothing(srv):
    with smtp(srv, "127.0.0.5") as s:
        s.ehlo("c")
        assert s.verify("test@test.com") == s.verify("nobody@test.com")
        s.mail("a@b.example")
        assert s.rcpt("nobody@test.com") == (
            550, b"5.1.1 sorry, no mailbox here by that name (#5.1.1)")
        assert s.rcpt("TEST@Test.Com")[0] == 250


def test_databytes_limit_gives_552_after_the_data(srv):
    with smtp(srv, "127.0.0.5") as s:
        s.ehlo("c")
        assert s.mail("a@b.example", ["SIZE=200000"])[0] == 552
        s.mail("a@b.example")
        s.rcpt("test@test.com")
        code, text = s.data(b"x" * 150000 + b"\r\n")
        assert (code, text) == (
            552, b"5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)")
        assert s.noop()[0] == 250                     # the session goes on


def test_max_recipients_gives_452(srv):
    with smtp(srv, "127.0.0.5") as s:
        s.ehlo("c")
        s.mail("a@b.example")
        answers = [s.rcpt("test@test.com")[0] for _ in range(7)]
        assert answers == [250] * 5 + [452] * 2


# --- raw sockets ------------------------------------------------------------------------------

def test_pipelined_session_in_one_packet_answers_in_order(srv):
    marker = f"{MARKER}-pipe-{time.monotonic_ns()}"
    r = Raw(srv, "127.0.0.6")
    assert r.reply().startswith("220 ")
    r.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<nobody@test.com>\r\n"
           b"RCPT TO:<x@remote.example>\r\nRCPT TO:<test@test.com>\r\nDATA\r\n")
    got = [r.reply()[:3] for _ in range(6)]
    assert got == ["250", "250", "550", "553", "250", "354"]
    r.send(f"Subject: p\r\n\r\n{marker}\r\n.\r\nNOOP\r\nQUIT\r\n".encode())
    assert r.reply().startswith("250 2.0.0 ok ")
    assert r.reply() == "250 2.0.0 ok\r\n"
    assert r.reply().startswith("221 ")
    assert r.closed_by_server()
    assert find_message(srv, marker)


def test_command_line_limits(srv):
    r = Raw(srv, "127.0.0.7")
    r.reply()
    r.send(b"NOOP " + b"x" * 2000 + b"\r\nNOOP\r\n")
    assert r.reply() == "500 sorry, command line too long (#5.5.2)\r\n"
    assert r.reply() == "250 ok\r\n"
    r.send(b"NO\0OP\r\n")
    assert r.reply() == "501 sorry, NUL in command (#5.5.2)\r\n"
    r.send(b"NOOP\n")
    assert r.reply() == "501 sorry, commands end in CRLF, not bare LF (#5.5.2)\r\n"
    r.close()


def test_megabytes_without_line_end_are_cut_off(srv):
    r = Raw(srv, "127.0.0.7")
    r.reply()
    sent = 0
    try:
        while sent < 8 << 20:
            r.send(b"A" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert r.reply() == "421 sorry, no line end in sight, closing connection (#4.7.0)\r\n"
    assert sent < 8 << 20 or r.closed_by_server()


def test_http_request_gets_502_and_close(srv):
    r = Raw(srv, "127.0.0.7")
    r.reply()
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.reply() == "502 sorry, this is an SMTP server, not a web server (#5.5.1)\r\n"
    assert r.closed_by_server()


def test_bare_lf_in_data_is_451_and_close_and_nothing_is_stored(srv):
    marker = f"{MARKER}-smuggle-{time.monotonic_ns()}"
    r = Raw(srv, "127.0.0.8")
    r.reply()
    r.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<test@test.com>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
    r.send(f"{marker}\r\n\n.\r\nMAIL FROM:<smuggled@x.example>\r\n".encode())
    assert r.reply() == "451 See http://pobox.com/~djb/docs/smtplf.html.\r\n"
    assert r.closed_by_server()
    assert find_message(srv, marker) == []


def test_deny_rule_closes_without_greeting(srv):
    r = Raw(srv, "127.0.0.10")
    assert r.reply() == ""


def test_talking_before_the_delayed_greeting_is_refused(srv):
    """GREETDELAY from the rules file is in force on the real server (without it the EHLO
    would get the 220 and a 250). That a patient client gets its 220 once the delay is over
    is timed with a clock in tests/adapters/test_smtp_protocol.py, not waited for here."""
    r = Raw(srv, "127.0.0.9")
    r.send(b"EHLO eager\r\n")
    assert r.reply() == "554 sorry, you talked before my greeting (#5.5.1)\r\n"
    assert r.closed_by_server()


def test_max_per_ip_gives_421_and_other_addresses_still_get_in(srv):
    held = [Raw(srv, "127.0.0.11") for _ in range(3)]
    for h in held:
        assert h.reply().startswith("220 ")
    extra = Raw(srv, "127.0.0.11")
    assert extra.reply() == "421 sorry, too many connections from your address (#4.7.0)\r\n"
    assert extra.closed_by_server()
    other = Raw(srv, "127.0.0.12")
    assert other.reply().startswith("220 ")
    for h in held + [other]:
        h.close()


def test_twenty_errors_close_the_session(srv):
    r = Raw(srv, "127.0.0.13")
    r.reply()
    r.send(b"BOGUS\r\n" * 20)
    for _ in range(20):
        assert r.reply() == "502 unimplemented (#5.5.1)\r\n"
    assert r.reply() == "421 sorry, too many errors, closing connection (#4.7.0)\r\n"
    assert r.closed_by_server()


# --- a server of its own: idle timeout, kill -9 -------------------------------------------------

def test_idle_timeout_and_kill_9_after_250_loses_nothing(make_server):
    s = make_server('default_domain = "test.com"\n[smtp]\ntimeout = 1\n'
                    '[routes]\n"" = "127.0.0.1:9"\n', name="timeout")
    s.root.mkdir(parents=True, exist_ok=True)
    s._write_config()
    s.cli("domain", "add", "test.com")
    s.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    s.start()
    idle = Raw(s, "127.0.0.14")
    assert idle.reply().startswith("220 ")
    started = time.monotonic()
    assert idle.reply() == "451 timeout (#4.4.2)\r\n"
    assert 0.9 <= time.monotonic() - started < 1 + IO_TIMEOUT / 2
    assert idle.closed_by_server()

    marker = f"{MARKER}-crash-{time.monotonic_ns()}"
    r = Raw(s, "127.0.0.15")
    r.reply()
    r.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<test@test.com>\r\nDATA\r\n")
    [r.reply() for _ in range(4)]
    r.send(f"Subject: crash\r\n\r\n{marker}\r\n.\r\n".encode())
    assert r.reply().startswith("250 ok ")
    s.kill()                                               # kill -9 right after the 250
    assert find_message(s, marker)
    s.start()
    assert find_message(s, marker)


# --- swaks ------------------------------------------------------------------------------------

def test_swaks_pipelined_delivery(srv):
    swaks = require_tool("swaks")
    marker = f"{MARKER}-swaks-{time.monotonic_ns()}"
    res = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{srv.port('smtp')}", "--local-interface", "127.0.0.16",
         "--helo", "swaks.example", "--from", "someone@remote.example", "--to", "test@test.com",
         "--pipeline", "--body", marker, "--timeout", "10"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "<-  250 2.0.0 ok " in res.stdout
    assert find_message(srv, marker)


def test_swaks_relay_attempt_is_refused(srv):
    swaks = require_tool("swaks")
    res = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{srv.port('smtp')}", "--local-interface", "127.0.0.17",
         "--from", "test@test.com", "--to", "victim@remote.example", "--timeout", "10"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert ("<** 553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
            in res.stdout)
