"""The tools an operator uses to see why (issue 17): `stat --json`, `--version`, the queue
commands, against the real server over its admin socket."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys

import mailappliance


def test_version_prints_the_package_version():
    res = subprocess.run([sys.executable, "-m", "mailappliance.cli", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert res.stdout == f"mailappliance {mailappliance.__version__}\n"


def test_stat_json_is_one_document_matching_stat(server):
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30) as c:
        c.sendmail("a@example.org", ["test@test.com"], b"Subject: s\r\n\r\nbody\r\n")
    res = server.cli("stat", "--json")
    doc = json.loads(res.stdout)
    assert doc["pid"] == server.proc.pid
    assert doc["hostname"] == "mx.test.example"
    kinds = {s["kind"]: s for s in doc["services"]}
    assert list(kinds) == ["smtp", "submission", "pop3", "admin"]
    assert kinds["smtp"]["connections_total"] == 1
    assert kinds["smtp"]["addresses"] == [f"127.0.0.1:{server.port('smtp')}"]
    # Every kind counts its connections: never "not counted".
    assert all(isinstance(s["connections_now"], int) for s in doc["services"])
    assert doc["queue"]["local_max"] == 10 and doc["queue"]["remote_max"] == 20
    assert doc["counters"]["queue"]["commits"] == 1
    assert set(doc["counters"]["deliveries"]) >= {"success", "deferral", "failure"}
    assert "not counted" not in server.cli("stat").stdout
