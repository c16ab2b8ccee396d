"""sd_notify from the real server: a test socket plays systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import socket
import time

import pytest

from tests.integration.opstools import admin

# systemd passes WATCHDOG_USEC; 0.4 s here means a ping every 0.2 s.
WATCHDOG_USEC = 400_000


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    yield path, s
    s.close()


def collect(s, until, timeout: float = 20.0) -> list[str]:
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(out):
        try:
            out.append(s.recv(4096).decode())
        except socket.timeout:
            pass
    return out


def test_ready_after_every_listener_watchdog_pings_and_stopping(make_server, notify_socket):
    path, sock = notify_socket
    srv = make_server(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    srv.start()
    msgs = collect(sock, lambda m: any(x.startswith("READY=1") for x in m))
    ready = next(m for m in msgs if m.startswith("READY=1"))
    assert f"MAINPID={srv.proc.pid}" in ready.splitlines()
    # READY=1 came after every listener was bound: all of them accept now.
    for kind in ("smtp", "submission", "pop3"):
        socket.create_connection(("127.0.0.1", srv.port(kind)), timeout=5).close()
    assert admin(srv, "relay list\n") == [(True, ["0 grants"])]
    assert sum(m == "WATCHDOG=1" for m in msgs) <= len(msgs)
    pings = collect(sock, lambda m: m.count("WATCHDOG=1") >= 5, timeout=10)
    assert pings.count("WATCHDOG=1") >= 5
    assert sum(m.startswith("READY=1") for m in msgs + pings) == 1
    srv.proc.send_signal(15)
    rest = collect(sock, lambda m: any(x.startswith("STOPPING=1") for x in m), timeout=15)
    assert any(m.startswith("STOPPING=1") for m in rest)
    assert srv.proc.wait(15) in (0, -15)          # twistd re-raises SIGTERM after a clean stop


def test_no_watchdog_pings_unless_asked(make_server, notify_socket):
    """A watchdog that is on pings once at start, before READY=1 (tests/adapters/
    test_notify_service.py, with a clock): so everything the server sends from its start to its
    STOPPING=1 is the window in which a wrong ping would show; no waiting needed."""
    path, sock = notify_socket
    srv = make_server(env={"NOTIFY_SOCKET": path}).start()
    msgs = collect(sock, lambda m: any(x.startswith("READY=1") for x in m))
    assert admin(srv, "relay list\n") == [(True, ["0 grants"])]     # a turn of its reactor
    srv.proc.send_signal(15)
    msgs += collect(sock, lambda m: any(x.startswith("STOPPING=1") for x in m), timeout=15)
    assert any(m.startswith("READY=1") for m in msgs)
    assert any(m.startswith("STOPPING=1") for m in msgs)
    assert "WATCHDOG=1" not in msgs
    assert srv.proc.wait(15) in (0, -15)
