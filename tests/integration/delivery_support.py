"""Helpers for the queue/delivery integration tests: smtp-sink as a receiving MTA, waiting,
reading Maildirs and the sink's transaction dumps."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_tool

# Bound on waiting for a delivery to show up (a local delivery takes milliseconds; the bound
# covers a slow CI disk).
DELIVERY_WAIT = 20.0
# Bound on smtp-sink start-up.
SINK_START = 10.0
POLL = 0.05


def wait_until(predicate, timeout: float = DELIVERY_WAIT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


def closed_port() -> int:
    """A loopback port nobody listens on (kernel-chosen, then released): connections to it
    are refused, and a server may take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


free_port = closed_port


def maildir_files(server, address: str = "test@test.com") -> list[Path]:
    local, domain = address.split("@")
    new = server.data / "domains" / domain / local / "Maildir" / "new"
    cur = new.parent / "cur"
    out = []
    for d in (new, cur):
        if d.exists():
            out.extend(sorted(d.iterdir()))
    return out


def queue_ids(server) -> list[str]:
    mess = server.data / "queue" / "mess"
    return sorted(os.listdir(mess)) if mess.exists() else []


@dataclass
class Transaction:
    mail_from: str
    rcpts: list[str]
    body: bytes        # the message as the sink stored it (LF line ends, un-dot-stuffed)


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, dumping each transaction to its own file."""

    def __init__(self, root: Path, *options: str, port: int | None = None) -> None:
        self.exe = require_tool("smtp-sink")
        self.want_port = port          # a given port (a destination that comes back)
        self.root = Path(root)
        # As root, smtp-sink writes as nobody, who cannot enter pytest's private tmp_path:
        # its dumps go to a world-writable directory of their own.
        self.dump = Path(tempfile.mkdtemp(prefix="smtp-sink-dump-"))
        self.options = list(options)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> "SmtpSink":
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dump, 0o777)         # smtp-sink drops to nobody when run as root
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        for _attempt in range(5):
            port = self.want_port or free_port()
            self.proc = subprocess.Popen(
                [self.exe, *user, "-d", str(self.dump) + "/%Y%m%d%H%M%S.", *self.options,
                 f"127.0.0.1:{port}", "64"],
                stdout=subprocess.DEVNULL, stderr=open(self.root / "sink.err", "ab"))
            deadline = time.monotonic() + SINK_START
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    self.port = port
                    return self
                except OSError:
                    time.sleep(POLL)
            self.stop()
        raise RuntimeError("smtp-sink did not start: " + (self.root / "sink.err").read_text())

    def transactions(self) -> list[Transaction]:
        out = []
        for p in sorted(self.dump.iterdir()):
            raw = p.read_bytes()
            head, _, rest = raw.partition(b"\nReceived: ")
            mail = re.search(rb"^X-Mail-Args: <([^>]*)>", head, re.M)
            rcpts = re.findall(rb"^X-Rcpt-Args: <([^>]*)>", head, re.M)
            # the sink adds its own Received: (with continuation lines) before the message
            # and one blank line after it
            lines = rest.split(b"\n")
            i = 1
            while i < len(lines) and lines[i][:1] in (b"\t", b" "):
                i += 1
            body = b"\n".join(lines[i:])
            if body.endswith(b"\n\n"):
                body = body[:-1]
            out.append(Transaction(mail.group(1).decode() if mail else "",
                                   [r.decode() for r in rcpts], body))
        return out

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dump, ignore_errors=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def clear(self) -> None:
        shutil.rmtree(self.dump, ignore_errors=True)
        self.dump.mkdir()
        os.chmod(self.dump, 0o777)


# A trickling MX sends one byte of its greeting this often. The test's reply deadline (2 s)
# ends the greeting after about 10 bytes, long before the last of TRICKLE_GREETING's (40 s).
TRICKLE_INTERVAL = 0.2
TRICKLE_GREETING = (b"220 trickle.example ESMTP " + b"slow" * 43 + b"\r\n")


class TrickleMX:
    """An MX on 127.0.0.1 that answers one byte at a time (issue 18's hostile server) and
    records, per connection, how many bytes it had sent when the client went away."""

    def __init__(self, greeting: bytes = TRICKLE_GREETING,
                 interval: float = TRICKLE_INTERVAL) -> None:
        import threading
        self.greeting = greeting
        self.interval = interval
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(POLL)
        self.port = self.listener.getsockname()[1]
        self.closed_after: list[int] = []     # bytes sent when the client hung up, per connection
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        import threading
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._trickle, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _trickle(self, conn: socket.socket) -> None:
        import select
        sent = 0
        with conn:
            try:
                while sent < len(self.greeting) and not self._stop.is_set():
                    conn.sendall(self.greeting[sent:sent + 1])
                    sent += 1
                    readable, _, _ = select.select([conn], [], [], self.interval)
                    if readable and not conn.recv(4096):
                        break                       # the client closed
                else:
                    return                          # greeting complete (or stopping)
            except OSError:
                pass                                # reset by the client: it hung up
            self.closed_after.append(sent)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for t in self._threads:
            t.join(5)


class CaptureMX:
    """A minimal receiving MTA on 127.0.0.1 that keeps each message's DATA exactly as it came
    over the wire (CRLF, dot-stuffing and all), to check what our client sends byte for byte
    (smtp-sink's dump is rewritten by Postfix's record reader)."""

    def __init__(self) -> None:
        import threading
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(POLL)
        self.port = self.listener.getsockname()[1]
        self.messages: list[bytes] = []       # raw DATA up to and including "\r\n.\r\n"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(DELIVERY_WAIT)
                try:
                    self._session(conn)
                except OSError:
                    pass

    def _session(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        conn.sendall(b"220 capture.example ESMTP\r\n")
        while True:
            line = f.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                conn.sendall(b"250-capture.example\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = f.readline()
                    if not chunk:
                        return
                    data += chunk
                self.messages.append(data)
                conn.sendall(b"250 ok\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(5)
