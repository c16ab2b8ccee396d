"""`mailappliance-sendmail` and `mailappliance sendmail` against a running server: the message
is durable in the queue when the command exits 0, the running queue manager picks it up, and
Bcc: never reaches the stored message."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.test_smtp_server import find_message

# Bound on waiting for the running server's queue manager to deliver a locally injected message.
DELIVERY_WAIT = 15.0


def console_script(name: str) -> list[str]:
    path = Path(sys.executable).parent / name
    if path.exists():
        return [str(path)]
    module = {"mailappliance-sendmail": "mailappliance.sendmail"}.get(name, "mailappliance.cli")
    return [sys.executable, "-m", module]


def wait_in_maildir(server, marker: str) -> list[Path]:
    maildir = server.data / "domains" / "test.com"
    deadline = time.monotonic() + DELIVERY_WAIT
    while time.monotonic() < deadline:
        hits = [p for p in find_message(server, marker) if maildir in p.parents]
        if hits:
            return hits
        time.sleep(0.05)
    return []


def test_sendmail_t_with_bcc_is_queued_and_delivered(server):
    marker = f"sendmail-t-{time.monotonic_ns()}"
    message = (f"From: Cron <root@test.com>\nTo: test@test.com\nBcc: test@test.com\n"
               f"Subject: nightly\n\n{marker}\n.\nnot part of the message\n")
    res = subprocess.run([*console_script("mailappliance-sendmail"),
                          "--config", str(server.config_path), "-t", "-f", "root@test.com"],
                         input=message.encode(), capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert find_message(server, marker), "exit 0 but nothing on disk"
    hits = wait_in_maildir(server, marker)
    assert hits, "the running server did not deliver the injected message"
    data = hits[0].read_bytes()
    assert b"Bcc:" not in data and b"not part of the message" not in data
    assert b"Received: (mailappliance-sendmail invoked by uid" in data


def test_admin_command_sendmail_with_i_and_plain_recipient(server):
    marker = f"sendmail-i-{time.monotonic_ns()}"
    res = subprocess.run([*console_script("mailappliance"), "--config", str(server.config_path),
                          "sendmail", "-i", "-F", "Backup Job", "test@test.com"],
                         input=f"Subject: backup\n\n{marker}\n.\nstill the message\n".encode(),
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    hits = wait_in_maildir(server, marker)
    assert hits
    data = hits[0].read_bytes()
    assert b"\n.\nstill the message\n" in data
    assert b"From: Backup Job <" in data


def test_sendmail_usage_error_exits_64(server):
    res = subprocess.run([*console_script("mailappliance-sendmail"),
                          "--config", str(server.config_path)],
                         input=b"Subject: x\n\nno recipients\n", capture_output=True, timeout=60)
    assert res.returncode == 64
    assert b"no recipients" in res.stderr
