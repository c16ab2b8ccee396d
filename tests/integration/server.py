"""Start the real `twistd -n mailappliance` on loopback with kernel-chosen ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Upper bound on start-up: the server binds, loads the queue and writes run/ready.json.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


class ServerProcess:
    """One server instance in its own directory; ports come from data/run/ready.json."""

    def __init__(self, root: Path, config: str = "", hostname: str = "mx.test.example",
                 extra_args: list[str] | None = None, env: dict | None = None,
                 twistd_args: list[str] | None = None, preexec_fn=None) -> None:
        self.root = Path(root)
        self.data = self.root / "var"
        self.config_text = config
        self.hostname = hostname
        self.extra_args = extra_args or []
        # twistd's own options (before the plugin name): --uid/--gid, --logger, ...
        self.twistd_args = twistd_args or []
        self.env = env
        self.preexec_fn = preexec_fn        # run in the child before twistd (setrlimit, ...)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, list] = {}
        self.config_path = self.root / "mailappliance.toml"

    def _write_config(self) -> None:
        base = (f'hostname = "{self.hostname}"\n'
                f'data = "{self.data}"\n'
                "bcrypt_cost = 4\n")
        text = self.config_text
        # No SPF/DKIM/DMARC of test mail unless the test configured [verify] itself: with the
        # product's defaults every message from a test client would be checked against the
        # machine's DNS (whose answers for example.com etc. the tests do not control).
        if "[verify]" not in text:
            text += '\n[verify]\nspf = "off"\ndkim = "off"\ndmarc = "off"\n'
        # Listen on kernel-chosen loopback ports unless the test configured [listen] itself.
        if "[listen]" not in text:
            text += ("\n[listen]\n"
                     'smtp = ["tcp:0:interface=127.0.0.1"]\n'
                     'submission = ["tcp:0:interface=127.0.0.1"]\n'
                     'pop3 = ["tcp:0:interface=127.0.0.1"]\n')
        self.config_path.write_text(base + text)

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the `mailappliance` command against this instance."""
        cmd = [sys.executable, "-m", "mailappliance.cli", "--config", str(self.config_path), *args]
        res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"{cmd} -> {res.returncode}: {res.stderr}")
        return res

    def start(self) -> "ServerProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self._write_config()
        ready = self.data / "run" / "ready.json"
        try:
            ready.unlink()
        except FileNotFoundError:
            pass
        self.log = open(self.root / "twistd.out", "ab")
        env = dict(os.environ)
        env.update(self.env or {})
        self.proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", *self.twistd_args, "mailappliance", "-c", str(self.config_path),
             *self.extra_args],
            cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                info = json.loads(ready.read_text())
                if info.get("pid") == self.proc.pid:
                    self.ports = info["listen"]
                    return self
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server not ready within {START_TIMEOUT}s:\n{self.output()}")

    def port(self, kind: str) -> int:
        return self.ports[kind][0]

    def stdout(self) -> str:
        """What the server wrote to standard output and standard error."""
        try:
            return (self.root / "twistd.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        """Standard output, then the mail log files (oldest first).  While the file log
        runs, twistd's standard output carries only health lines (warnings, errors, server
        events; see mailappliance/logging.py), so mail-log lines are read from the files."""
        parts = [self.stdout()]
        log_dir = self.data / "log"
        try:
            names = sorted(n for n in os.listdir(log_dir) if n.startswith("@"))
        except FileNotFoundError:
            names = []
        for name in [*names, "current"]:
            try:
                parts.append((log_dir / name).read_text(errors="replace"))
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
        return "".join(parts)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """kill -9: the crash the durability promise is about."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)


def tls_submission_server(root: Path, extra: str = "") -> ServerProcess:
    """A server (not started) with a certificate made for the test, SMTP, submission and
    submissions on loopback (no POP3: not the embedded default's fixed port), remote mail
    routed to a closed port, and the domain test.com; `server.cert`, `server.key` name the
    certificate's files. The caller adds users."""
    from tests.pop3_support import make_cert
    cert, key = make_cert(root / "tls")
    config = (f'default_domain = "test.com"\n'
              f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
              "[listen]\n"
              'smtp = ["tcp:0:interface=127.0.0.1"]\n'
              'submission = ["tcp:0:interface=127.0.0.1"]\n'
              'submissions = ["tcp:0:interface=127.0.0.1"]\n'
              "pop3 = []\n"
              '[routes]\n"" = "127.0.0.1:9"\n' + extra)
    server = ServerProcess(root, config)
    server.root.mkdir(parents=True, exist_ok=True)
    server._write_config()
    server.cli("domain", "add", "test.com")
    server.cert, server.key = cert, key
    return server
