"""`mailappliance dkim keygen` keys, published on the loopback DNS server exactly as the command
printed them, sign mail that OpenDKIM's library (an implementation independent of ours and of
dkimpy) verifies -- RSA and Ed25519, both signatures on one message; alterations fail."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mailappliance.mailauth.keys import KeyRegistry
from mailappliance.mailauth.service import Signer
from mailappliance.testing.dnsserver import DNSServerProcess
from tests.integration.opendkim import OpenDKIM

MESSAGE = (b"From: Alice <alice@signed.test>\nTo: bob@example.org\nSubject: quarterly  report\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <r1@signed.test>\n"
           b"MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n"
           b"Numbers attached.  \n\n-- \nAlice\n\n\n")


def cli(data, *args, check=True):
    res = subprocess.run([sys.executable, "-m", "mailappliance.cli", "--data", str(data), *args],
                         capture_output=True, text=True, timeout=60)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def record_of(output: str) -> tuple[str, str]:
    """(name, TXT text) from the zone line `dkim keygen` prints."""
    m = re.search(r"^(\S+)\. IN TXT \( (.*) \)$", output, re.M)
    assert m, output
    return m.group(1), "".join(re.findall(r'"([^"]*)"', m.group(2)))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "users.sqlite").touch()           # an instance (commands never invent one)
    rsa_name, rsa_txt = record_of(cli(data, "dkim", "keygen", "signed.test").stdout)
    ed_name, ed_txt = record_of(cli(data, "dkim", "keygen", "signed.test", "--selector", "ed",
                                    "--algorithm", "ed25519").stdout)
    assert rsa_name == "mail._domainkey.signed.test" and ed_name == "ed._domainkey.signed.test"
    zones = {"signed.test": {"mail._domainkey": [["TXT", rsa_txt]],
                             "ed._domainkey": [["TXT", ed_txt]]}}
    with DNSServerProcess(zones) as dns:
        verifier = OpenDKIM((dns.host, dns.port))
        yield data, verifier
        verifier.close()


def signed(data) -> bytes:
    signer = Signer(KeyRegistry(data), reactor=None, threadpool=None)
    return signer.sign_now(MESSAGE, "alice@signed.test") + MESSAGE


def test_opendkim_verifies_both_signatures(published):
    data, opendkim = published
    checks = opendkim.verify(signed(data))
    assert [(c.selector, c.passed) for c in checks] == [("mail", True), ("ed", True)], checks
    assert {"mail._domainkey.signed.test", "ed._domainkey.signed.test"} <= set(opendkim.lookups)


@pytest.mark.parametrize("change", [
    lambda m: m.replace(b"Numbers attached.", b"Numbers attached!"),
    lambda m: m.replace(b"Subject: quarterly", b"Subject: Quarterly"),
    lambda m: b"From: mallory@signed.test\n" + m,
])
def test_altered_in_transit_fails_in_opendkim(published, change):
    data, opendkim = published
    checks = opendkim.verify(change(signed(data)))
    assert len(checks) == 2 and not any(c.passed for c in checks)


def test_relayed_copy_with_added_trace_fields_still_verifies(published):
    data, opendkim = published
    relayed = b"Received: from mx by relay; Mon, 1 Jan 2024\nX-Scanned: yes\n" + signed(data)
    assert all(c.passed for c in opendkim.verify(relayed))


def test_dkim_list_prints_each_selector_and_reports_bad_files(published, tmp_path):
    data, _ = published
    listing = cli(data, "dkim", "list").stdout
    assert "signed.test ed ed25519" in listing and "signed.test mail rsa" in listing
    bad = data / "dkim" / "broken._domainkey.signed.test.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    try:
        res = cli(data, "dkim", "list")
        assert res.stderr.count("\n") == 1 and "broken._domainkey.signed.test.pem" in res.stderr
    finally:
        bad.unlink()


def test_keygen_refuses_existing_selector_and_missing_instance(published, tmp_path):
    data, _ = published
    res = cli(data, "dkim", "keygen", "signed.test", check=False)
    assert res.returncode == 1 and "exists already" in res.stderr and res.stderr.count("\n") == 1
    res = cli(tmp_path / "nothing", "dkim", "keygen", "x.test", check=False)
    assert res.returncode == 78 and "no mailappliance instance" in res.stderr   # EX_CONFIG
    assert not (tmp_path / "nothing").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as the data owner")
def test_keygen_as_root_writes_as_the_data_owner():
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="ma-dkim-", dir="/tmp"))    # pytest's tmp is 0700
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir()
    (data / "users.sqlite").touch()
    os.chown(data / "users.sqlite", nobody.pw_uid, nobody.pw_gid)
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    try:
        cli(data, "dkim", "keygen", "owned.test", "--algorithm", "ed25519")
        key = data / "dkim" / "mail._domainkey.owned.test.pem"
        for path in (key, key.parent):
            assert os.stat(path).st_uid == nobody.pw_uid
        assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    finally:
        shutil.rmtree(root)
