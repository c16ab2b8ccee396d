"""Real scanning daemons for tests and benchmarks, each private to a temp directory.

- ClamdDaemon: Debian's clamav-daemon (`clamd --foreground`) with its own clamd.conf, a unix
  socket and a signature database written here (no download: the official database is not
  reachable from test machines, and a tiny one starts in tens of milliseconds). EICAR is in it
  twice: as an MD5 hash signature (.hdb, `md5:size:name`), which catches the 68-byte file
  itself and a decoded attachment, and as a body signature (.ndb, `name:0:*:hex`), which also
  catches EICAR inline in a text body, where the hash of the whole part does not match.
- RspamdDaemon: Debian's rspamd with a minimal rspamd.conf (no stock modules, no DNS, no
  Redis) and a Lua rule file this module writes: a message containing SPAM_TOKEN scores 20,
  one containing SUSPECT_TOKEN scores 8. A tiny public-suffix list replaces the stock one,
  whose compilation alone takes ~17 s of start-up here (1.4 s with the tiny one).

Both are ready when their health check answers (clamd: PING -> PONG; rspamd: GET /ping ->
pong). `start()` calls require_tool first: a missing daemon skips outside CI and fails under
CI=true (.ci/run installs clamav-daemon and rspamd).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from mailappliance.testing.scanners import EICAR, SPAM_TOKEN

# Upper bound on a daemon's start-up before the test gives up (clamd with the tiny database is
# ready in ~0.03 s here, rspamd in ~1.4 s; a loaded CI machine may be ten times slower).
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
# How often the readiness probe is retried while a daemon starts.
PROBE_INTERVAL = 0.02

SUSPECT_TOKEN = b"MAILAPPLIANCE-TEST-SUSPECT-7c1e"
SPAM_SCORE = 20.0
SUSPECT_SCORE = 8.0
EICAR_HASH_NAME = "Eicar-Test-Hash"
EICAR_BODY_NAME = "Eicar-Test-Body"
# clamd's StreamMaxLength for the session daemon: small, so a test can send a message at and
# over the limit without moving tens of MiB.
STREAM_MAX = 1024 * 1024


def _require(name: str) -> str:
    from tests.conftest import require_tool
    return require_tool(name)


def _short_dir(prefix: str) -> Path:
    """A directory for unix sockets: sun_path holds at most 107 bytes, pytest's tmp paths can
    be longer."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class _Daemon:
    name = "daemon"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sockdir = _short_dir(f"ma-{self.name}-")
        os.chmod(self.sockdir, 0o755)
        self.socket = self.sockdir / f"{self.name}.sock"
        self.log = self.root / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        return f"unix:{self.socket}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def probe(self) -> bool:
        raise NotImplementedError

    def start(self) -> "_Daemon":
        cmd = self.command()
        self.starts += 1
        out = open(self.root / f"{self.name}.out", "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start:"
                                   f" {self.tail()}")
            if self.probe():
                return self
            time.sleep(PROBE_INTERVAL)
        self.kill()
        raise RuntimeError(f"{self.name} not ready within {START_TIMEOUT:g} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        text = ""
        for p in (self.root / f"{self.name}.out", self.log):
            if p.exists():
                text += p.read_text(errors="replace")[-n:]
        return text

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL to the whole process group (rspamd's workers too), and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
        try:                       # workers that outlive their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """User + system CPU of the daemon and its reaped children (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = sum(int(x) for x in fields[11:15])     # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def _ask(self, request: bytes) -> bytes:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2.0)
        try:
            s.connect(str(self.socket))
            s.sendall(request)
            data = b""
            while True:
                got = s.recv(4096)
                if not got:
                    return data
                data += got
        except OSError:
            return b""
        finally:
            s.close()


class ClamdDaemon(_Daemon):
    name = "clamd"

    def __init__(self, root: Path, stream_max: int = STREAM_MAX) -> None:
        super().__init__(root)
        self.stream_max = stream_max
        db = self.root / "db"
        db.mkdir(exist_ok=True)
        (db / "test.hdb").write_text(
            f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{EICAR_HASH_NAME}\n")
        (db / "test.ndb").write_text(f"{EICAR_BODY_NAME}:0:*:{EICAR.hex()}\n")
        self.config = self.root / "clamd.conf"
        self.config.write_text(
            "Foreground yes\n"
            f"LocalSocket {self.socket}\n"
            "LocalSocketMode 666\n"
            f"DatabaseDirectory {db}\n"
            f"LogFile {self.log}\n"
            f"PidFile {self.root / 'clamd.pid'}\n"
            "ScanMail yes\n"
            f"StreamMaxLength {stream_max}\n"
            "MaxThreads 4\n")

    def command(self) -> list[str]:
        return [_require("clamd"), "--foreground", f"--config-file={self.config}"]

    def probe(self) -> bool:
        return self._ask(b"zPING\0").startswith(b"PONG")


RSPAMD_RULES = f"""
local function has(task, token)
  local content = task:get_content()
  return content ~= nil and tostring(content):find(token, 1, true) ~= nil
end
rspamd_config:register_symbol{{
  name = 'MAILAPPLIANCE_TEST_SPAM', score = {SPAM_SCORE}, description = 'test rule: spam token',
  callback = function(task) return has(task, '{SPAM_TOKEN.decode()}') end,
}}
rspamd_config:register_symbol{{
  name = 'MAILAPPLIANCE_TEST_SUSPECT', score = {SUSPECT_SCORE}, description = 'test rule: suspect',
  callback = function(task) return has(task, '{SUSPECT_TOKEN.decode()}') end,
}}
"""


class RspamdDaemon(_Daemon):
    name = "rspamd"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        (self.root / "rules.lua").write_text(RSPAMD_RULES)
        (self.root / "tld.dat").write_text("com\norg\nnet\ntest\nexample\n")
        dbdir = self.root / "db"
        dbdir.mkdir(exist_ok=True)
        self.config = self.root / "rspamd.conf"
        self.config.write_text(f"""
options {{
  pidfile = "{self.root / 'rspamd.pid'}";
  filters = "";
  url_tld = "{self.root / 'tld.dat'}";
  hs_cache_dir = "{dbdir}";
  stats_file = "{dbdir / 'stats.ucl'}";
  tempdir = "{self.root}";
  dns {{ nameserver = ["127.0.0.1:9"]; timeout = 1s; retransmits = 1; }}
}}
logging {{ type = "file"; filename = "{self.log}"; level = "notice"; }}
worker "normal" {{
  bind_socket = "{self.socket} mode=0666";
  count = 1;
  task_timeout = 20s;
}}
actions {{ reject = 15; add_header = 6; greylist = null; }}
lua = "{self.root / 'rules.lua'}";
""")

    def command(self) -> list[str]:
        return [_require("rspamd"), "-f", "-i", "-c", str(self.config),
                "--var", f"DBDIR={self.root / 'db'}", "--var", f"RUNDIR={self.root}",
                "--var", f"LOGDIR={self.root}"]

    def probe(self) -> bool:
        return self._ask(b"GET /ping HTTP/1.0\r\n\r\n").rstrip().endswith(b"pong")


class ScannerProxy:
    """A unix socket in front of a scanner, in a thread of its own (it works whatever reactor
    or process the client runs in). While `hold` is set -- always, without a `target` -- it
    accepts connections, reads what comes and never answers: a scanner that hangs (on
    connections it already forwards too: a client's kept connection hangs from then on).
    Otherwise it forwards both ways to `target` (a unix socket path). `held` counts the bytes
    it read and kept, so a test can wait until a client is in the middle of a scan."""

    def __init__(self, target: str | None = None, hold: bool | None = None) -> None:
        import threading
        self.target = target
        self.hold = target is None if hold is None else hold
        self.dir = _short_dir("ma-proxy-")
        self.path = self.dir / "scanner.sock"
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(self.path))
        self.sock.listen(64)
        self.peer: dict[socket.socket, socket.socket | None] = {}
        self.clients: set[socket.socket] = set()
        self.held = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"unix:{self.path}"

    def _accept(self) -> None:
        try:
            c, _ = self.sock.accept()
        except OSError:
            return
        up = None
        if not self.hold and self.target is not None:
            up = socket.socket(socket.AF_UNIX)
            try:
                up.connect(self.target)
            except OSError:
                up.close()
                c.close()
                return
            self.peer[up] = c
        self.peer[c] = up
        self.clients.add(c)

    def _drop(self, s: socket.socket) -> None:
        other = self.peer.pop(s, None)
        self.clients.discard(s)
        s.close()
        if other is not None:
            self.clients.discard(other)
            self.peer.pop(other, None)
            other.close()

    def _run(self) -> None:
        import select
        while not self._stop:
            r, _, _ = select.select([self.sock, *self.peer], [], [], 0.05)
            for s in r:
                if s is self.sock:
                    self._accept()
                    continue
                if s not in self.peer:
                    continue
                try:
                    got = s.recv(65536)
                except OSError:
                    got = b""
                if not got:
                    self._drop(s)
                    continue
                other = self.peer[s]
                if other is None or (self.hold and s in self.clients):
                    self.held += len(got)          # read and kept: never answered
                    continue
                try:
                    other.sendall(got)
                except OSError:
                    self._drop(s)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for s in list(self.peer):
            s.close()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def SilentServer() -> ScannerProxy:
    """A scanner that accepts and never answers."""
    return ScannerProxy()
