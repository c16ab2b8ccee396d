"""`twistd -n mailappliance`: starts in an empty directory, refuses bad config in one line,
stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from tests.integration.server import TWISTD

LOOPBACK_ANY = "tcp:0:interface=127.0.0.1"


def wait_ready(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                pass
        time.sleep(0.05)
    raise AssertionError("not ready")


def test_starts_in_an_empty_directory_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "mailappliance", "--smtp", LOOPBACK_ANY,
         "--submission", LOOPBACK_ANY, "--pop3", LOOPBACK_ANY],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info = wait_ready(tmp_path / "var" / "run" / "ready.json", proc)
        assert info["pid"] == proc.pid
        assert (tmp_path / "var" / "users.sqlite").exists(), "embedded default data dir ./var"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
    assert "Server Shut Down." in out


def test_bad_configuration_stops_startup_with_one_line(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text("[smtp]\nmax_recipients = \"lots\"\n")
    r = subprocess.run([*TWISTD, "-n", "--pidfile=", "mailappliance", "-c", str(cfg)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr == (f"mailappliance: {cfg}: smtp.max_recipients: expected integer, "
                        "got string\n"), r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_bad_endpoint_on_command_line(tmp_path):
    r = subprocess.run([*TWISTD, "-n", "--pidfile=", "mailappliance", "--smtp", "tcp:notaport"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.startswith("mailappliance: command line: listen.smtp: bad endpoint "), r.stderr
    assert r.stderr.count("\n") == 1
