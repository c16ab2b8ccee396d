"""Real POP3 clients (Debian's fetchmail and mpop) fetching and deleting from the real server,
over plain POP3, STLS and pop3s, checking the server certificate. Under CI=true a missing
client fails the test (tests.conftest.require_tool)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.test_pop3_server import PASSWORD, maildir, start_with_user, tls_config
from tests.pop3_support import deliver, make_cert, message

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT = 60
MESSAGES = 3


@pytest.fixture
def certs(tmp_path):
    return make_cert(tmp_path / "tls")


@pytest.fixture
def tls_server(make_server, certs):
    return start_with_user(make_server(tls_config(*certs)))


def fill(srv) -> list[bytes]:
    contents = [message(i, 3000 + i) + b".leading dot line\n" for i in range(MESSAGES)]
    for i, c in enumerate(contents):
        deliver(maildir(srv), c, mtime=1_700_000_000 + i)
    return contents


def assert_fetched_and_deleted(srv, got: list[bytes], contents: list[bytes]) -> None:
    # Clients may add their own header lines (Received:, Return-Path:, X-...), so compare the
    # original content as a suffix with line ends normalised.
    norm = sorted(g.replace(b"\r\n", b"\n") for g in got)
    assert len(norm) == len(contents)
    for c in contents:
        assert sum(1 for g in norm if g.endswith(c)) == 1, c[:80]
    md = maildir(srv)
    assert os.listdir(md / "new") == [] and os.listdir(md / "cur") == []


@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_fetchmail_fetches_and_deletes(tls_server, certs, tmp_path, mode):
    fetchmail = require_tool("fetchmail")
    contents = fill(tls_server)
    out = tmp_path / "fetched"
    out.mkdir()
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {out}/msg.XXXXXX)"\n')
    mda.chmod(0o755)
    port = tls_server.port("pop3s" if mode == "pop3s" else "pop3")
    tls = {"plain": "sslproto ''",
           "stls": f"sslproto tls1.2+ sslcertck sslcertfile {certs[0]}",
           "pop3s": f"ssl sslcertck sslcertfile {certs[0]}"}[mode]
    rc = tmp_path / "fetchmailrc"
    rc.write_text("set no syslog\nset no bouncemail\n"
                  f"poll localhost service {port} protocol pop3 auth password timeout 20\n"
                  f'  user "test" there with password "{PASSWORD}" is "root" here\n'
                  f'  mda "{mda}"\n  no keep fetchall {tls}\n')
    rc.chmod(0o600)
    res = subprocess.run([fetchmail, "-f", str(rc), "-N", "--nosyslog", "-v",
                          "--pidfile", str(tmp_path / "fetchmail.pid")],
                         capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                         env={**os.environ, "HOME": str(tmp_path),
                              "FETCHMAILHOME": str(tmp_path)})
    assert res.returncode == 0, res.stdout + res.stderr
    if mode == "stls":
        assert "upgrade to TLS succeeded" in res.stdout + res.stderr
    if mode != "plain":
        assert "PASS" in res.stdout + res.stderr            # it did log in, inside TLS
    assert_fetched_and_deleted(tls_server, [p.read_bytes() for p in out.iterdir()], contents)


@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_mpop_fetches_and_deletes(tls_server, certs, tmp_path, mode):
    mpop = require_tool("mpop")
    contents = fill(tls_server)
    out = tmp_path / "Maildir"
    for d in ("tmp", "new", "cur"):
        (out / d).mkdir(parents=True)
    port = tls_server.port("pop3s" if mode == "pop3s" else "pop3")
    res = subprocess.run(
        [mpop, "--host=localhost", f"--port={port}", "--auth=user", "--user=test",
         f"--passwordeval=echo '{PASSWORD}'", "--tls=on",
         f"--tls-starttls={'on' if mode == 'stls' else 'off'}", f"--tls-trust-file={certs[0]}",
         f"--delivery=maildir,{out}", "--keep=off", "--only-new=off",
         f"--uidls-file={tmp_path / 'uidls'}", "--timeout=20"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
        env={**os.environ, "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert_fetched_and_deleted(tls_server, [p.read_bytes() for p in (out / "new").iterdir()],
                               contents)


def test_mpop_keep_and_only_new_uses_stable_uidls(tls_server, certs, tmp_path):
    """With --keep=on the messages stay (moved to cur/ at QUIT); the second run finds their
    UIDLs unchanged and fetches nothing new."""
    mpop = require_tool("mpop")
    fill(tls_server)
    out = tmp_path / "Maildir"
    for d in ("tmp", "new", "cur"):
        (out / d).mkdir(parents=True)
    cmd = [mpop, "--host=localhost", f"--port={tls_server.port('pop3s')}", "--auth=user",
           "--user=test", f"--passwordeval=echo '{PASSWORD}'", "--tls=on",
           "--tls-starttls=off", f"--tls-trust-file={certs[0]}", f"--delivery=maildir,{out}",
           "--keep=on", "--only-new=on", f"--uidls-file={tmp_path / 'uidls'}", "--timeout=20"]
    env = {**os.environ, "HOME": str(tmp_path)}
    for _ in range(2):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
    assert len(os.listdir(out / "new")) == MESSAGES          # fetched once, not twice
    md = maildir(tls_server)
    assert os.listdir(md / "new") == [] and len(os.listdir(md / "cur")) == MESSAGES


@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_mpop_default_auth_on_logs_in(tls_server, certs, tmp_path, mode):
    """mpop's default `auth on` picks APOP whenever the greeting carries an RFC 1939
    <timestamp>; the greeting has none (APOP is not offered), so mpop uses USER/PASS."""
    mpop = require_tool("mpop")
    contents = fill(tls_server)
    out = tmp_path / "Maildir"
    for d in ("tmp", "new", "cur"):
        (out / d).mkdir(parents=True)
    port = tls_server.port("pop3s" if mode == "pop3s" else "pop3")
    res = subprocess.run(
        [mpop, "--host=localhost", f"--port={port}", "--user=test",
         f"--passwordeval=echo '{PASSWORD}'", "--tls=on",
         f"--tls-starttls={'on' if mode == 'stls' else 'off'}", f"--tls-trust-file={certs[0]}",
         f"--delivery=maildir,{out}", "--keep=off", "--only-new=off",
         f"--uidls-file={tmp_path / 'uidls'}", "--timeout=20"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
        env={**os.environ, "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert_fetched_and_deleted(tls_server, [p.read_bytes() for p in (out / "new").iterdir()],
                               contents)
