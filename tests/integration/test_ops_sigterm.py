"""SIGTERM on the real server: it stops accepting, an idle session gets 421 at once, a session
in the middle of DATA finishes (250, message safely queued) and is then closed, the process
exits within the drain bound, and the accepted message is delivered."""

from __future__ import annotations

import signal
import socket
import time

from mailappliance.drain import CLOSE_GRACE, DRAIN_TIMEOUT
from tests.integration.opstools import wait_for


def read_reply(s: socket.socket, timeout: float = 20.0) -> bytes:
    """One SMTP reply (possibly multi-line)."""
    s.settimeout(timeout)
    buf = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return buf
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return buf


def smtp_session(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    assert read_reply(s).startswith(b"220 ")
    s.sendall(b"EHLO client.test\r\n")
    assert read_reply(s).startswith(b"250")
    return s


def test_sigterm_lets_data_finish_and_421s_the_idle(server):
    port = server.port("smtp")
    busy = smtp_session(port)
    busy.sendall(b"MAIL FROM:<sender@example.org>\r\n")
    assert read_reply(busy).startswith(b"250")
    busy.sendall(b"RCPT TO:<test@test.com>\r\n")
    assert read_reply(busy).startswith(b"250")
    busy.sendall(b"DATA\r\n")
    assert read_reply(busy).startswith(b"354")
    # The 354 made this session busy (the drain lets it finish); whether the server reads the
    # first half before or after the SIGTERM, the transfer must complete.
    busy.sendall(b"Subject: in flight at SIGTERM\r\n\r\nfirst half\r\n")
    idle = smtp_session(port)

    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    reply = read_reply(idle)
    assert reply.startswith(b"421 "), reply      # the idle session is told at once
    assert read_reply(idle) == b""               # and closed
    # No new connections once the stop began.
    def refused():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return False
        except ConnectionRefusedError:
            return True
    wait_for(refused, timeout=10, what="listener closed")
    assert server.proc.poll() is None            # still draining the transfer

    busy.sendall(b"second half\r\n.\r\n")
    reply = read_reply(busy)
    assert reply.startswith(b"250 "), reply      # accepted: on disk and fsynced
    rest = read_reply(busy)                      # then told to go
    assert rest == b"" or rest.startswith(b"421 "), rest
    code = server.proc.wait(DRAIN_TIMEOUT + CLOSE_GRACE + 15)
    assert code in (0, -signal.SIGTERM)
    assert time.monotonic() - t0 < DRAIN_TIMEOUT

    # Nothing lost: delivered before the stop, or by the next start.
    new = server.data / "domains" / "test.com" / "test" / "Maildir" / "new"
    if not any(new.iterdir()):
        server.start()
        wait_for(lambda: any(new.iterdir()), what="delivery after restart")
    [msg] = list(new.iterdir())
    text = msg.read_text()
    assert "first half\nsecond half\n" in text and "in flight at SIGTERM" in text


def test_sigterm_with_no_sessions_exits_promptly(server):
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) in (0, -signal.SIGTERM)
    assert time.monotonic() - t0 < 5
    assert not (server.data / "run" / "ready.json").exists()
    assert not (server.data / "admin.sock").exists()
