"""Helpers for the operations integration tests: talk to a running server's admin socket, read
its mail log."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from mailappliance.admin.protocol import ReplyReader
from mailappliance.logging import iter_log_files

# Every wait on the server is bounded; a healthy server answers admin commands in milliseconds.
REPLY_TIMEOUT = 20.0


def admin_path(server) -> Path:
    return server.data / "admin.sock"


def admin_connect(server, timeout: float = REPLY_TIMEOUT) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(admin_path(server)))
    return s


def read_replies(s: socket.socket, count: int, timeout: float = REPLY_TIMEOUT):
    reader = ReplyReader()
    deadline = time.monotonic() + timeout
    while len(reader.replies) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(reader.replies)} of {count} replies in {timeout}s")
        data = s.recv(65536)
        if not data:
            break
        reader.receive_data(data)
    return reader.replies


def admin(server, text: str, count: int | None = None):
    """Send `text` (lines) on a fresh connection; return `count` reply blocks (ok, lines)."""
    if count is None:
        count = sum(1 for line in text.splitlines() if line.strip())
    with admin_connect(server) as s:
        s.sendall(text.encode())
        return read_replies(s, count)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_for(predicate, timeout: float = REPLY_TIMEOUT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout}s")


def log_text(server) -> str:
    """The server's whole mail log: rotated files oldest first, then `current`. A rotated file
    that the server removes (beyond `keep`) between the listing and the read is skipped: it is
    no longer part of the log."""
    parts = []
    for p in iter_log_files(server.data / "log"):
        try:
            parts.append(p.read_text(errors="replace"))
        except FileNotFoundError:
            pass
    return "".join(parts)


def wait_for_log(server, *needles: str, timeout: float = REPLY_TIMEOUT) -> str:
    """The mail log once it holds every needle. A line reaches the file up to a flush
    interval (mailappliance.logging.FLUSH_INTERVAL) after the reply that follows it."""
    def holds() -> str | None:
        text = log_text(server)
        return text if all(n in text for n in needles) else None
    return wait_for(holds, timeout, what=f"{needles} in the mail log")
