"""`mailappliance import qmail` end to end: a synthetic qmail + vpopmail host imported with the
real command, then the real server on loopback: every user logs in over POP3 with the old
password and sees the UIDLs qmail-pop3d gave, the first login rewrites the hash to bcrypt and
the next still works (POP3 and SMTP AUTH), a disabled user cannot log in, the aliases deliver
and the copied rules relay as before. Then interruption: the import killed with SIGKILL at
many points (and once by a real signal while mail is moving) and run again ends with the same
tree as an uninterrupted run, without a duplicate."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailappliance.migrate.execute import KILL_AFTER_ENV
from mailappliance.users import legacy
from tests.integration.server import ServerProcess
from tests.qmail_tree import (
    PASSWORD, Msg, TDomain, TUser, sample_tree, uidls, write_tree)

pytestmark = pytest.mark.integration

IO_TIMEOUT = 20
# Bound on a message's trip SMTP -> queue -> alias forward -> Maildir on a loaded 2-core box.
DELIVERY_TIMEOUT = 30.0
# Bound on one import of the small trees here.
IMPORT_TIMEOUT = 120
# Users that log in over POP3 in test_every_user_logs_in...; the SMTP AUTH test uses its own.
AUTH_USER = "postmaster@example.net"
CLEAR_PASSWORDS = {"erin@example.com": "Clear-text9", "dave@example.com": "Desp4ss!"}

CONFIG = """default_domain = "example.com"
[submission]
auth_plaintext_loopback = true
[routes]
"" = "127.0.0.1:9"
"""


def import_cmd(config: Path, tree, *extra: str, env: dict | None = None,
               check_rc=(0, 1)) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mailappliance.cli", "--config", str(config),
           "import", "qmail", *tree.args(), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=IMPORT_TIMEOUT,
                         env={**os.environ, **(env or {})})
    if check_rc is not None and res.returncode not in check_rc:
        raise AssertionError(f"{cmd} -> {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def hash_of(data: Path, address: str) -> str:
    local, domain = address.split("@")
    with sqlite3.connect(f"file:{data / 'users.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT password_hash FROM users WHERE domain=? AND local=?",
                          (domain, local)).fetchone()[0]


class POP3From(poplib.POP3):
    def __init__(self, port, source_ip):
        self.source_ip = source_ip
        super().__init__("127.0.0.1", port, timeout=IO_TIMEOUT)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source_ip, 0))


class SMTPFrom(smtplib.SMTP):
    def __init__(self, port, source_ip):
        super().__init__("127.0.0.1", port, timeout=IO_TIMEOUT,
                         source_address=(source_ip, 0))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-qmail")
    tree = sample_tree(root / "old-host")
    srv = ServerProcess(root / "server", CONFIG)
    srv.root.mkdir(parents=True)
    srv._write_config()
    res = import_cmd(srv.config_path, tree, "--link")
    assert res.returncode == 1, res.stdout + res.stderr     # the malformed vpasswd line
    assert "mailappliance: import found 1 error " in res.stderr
    srv.report = res.stdout
    srv.tree = tree
    # The server's configuration takes the checked copy of tcp.smtp the import wrote.
    srv.config_text = CONFIG + f'[smtp]\nrules = "{srv.root / "qmail-import.tcp.smtp"}"\n'
    srv._write_config()
    srv.start()
    yield srv
    srv.stop()


def password_of(address: str) -> str:
    return CLEAR_PASSWORDS.get(address, PASSWORD)


def test_the_report_names_the_written_files_and_ends_with_what_to_do(imported):
    report = imported.report
    assert f"{imported.root / 'qmail-import.toml'}: written" in report
    assert "What you must still do\n  1. " in report
    assert "frank@example.com" in report.split("What you must still do")[1]


def test_every_user_logs_in_with_the_old_password_and_sees_qmail_pop3d_uidls(imported):
    tree = imported.tree
    port = imported.port("pop3")
    n = 10
    for d in tree.domains:
        for user in d.users:
            address = f"{user.name}@{d.name}"
            if user.scheme == "unknown" or address == AUTH_USER:
                continue
            n += 1
            old_hash = hash_of(imported.data, address)
            assert not old_hash.startswith("$2") or user.scheme == "clear"
            for attempt in (1, 2):              # the second login uses the bcrypt hash
                pop = POP3From(port, f"127.0.0.{n}")
                try:
                    pop.user(address)
                    assert pop.pass_(password_of(address)).startswith(b"+OK"), address
                    listed = [line.split()[1].decode() for line in pop.uidl()[1]]
                    assert sorted(listed) == uidls(user), address
                finally:
                    pop.quit()
                assert hash_of(imported.data, address).startswith("$2"), address


def test_the_disabled_user_cannot_log_in(imported):
    pop = POP3From(imported.port("pop3"), "127.0.0.40")
    try:
        pop.user("frank@example.com")
        with pytest.raises(poplib.error_proto):
            pop.pass_(PASSWORD)
    finally:
        pop.close()
    assert hash_of(imported.data, "frank@example.com").startswith("!")


def test_smtp_auth_accepts_the_old_hash_and_rewrites_it(imported):
    before = hash_of(imported.data, AUTH_USER)
    assert before.startswith("$6$")
    for _ in (1, 2):
        with SMTPFrom(imported.port("submission"), "127.0.0.41") as s:
            s.ehlo("client.example")
            assert s.login(AUTH_USER, PASSWORD)[0] == 235
        assert hash_of(imported.data, AUTH_USER).startswith("$2")


def wait_for_subject(maildir: Path, subject: str) -> Path:
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while time.monotonic() < deadline:
        for sub in ("new", "cur"):
            for p in (maildir / sub).iterdir():
                if f"Subject: {subject}".encode() in p.read_bytes():
                    return p
        time.sleep(0.05)
    raise AssertionError(f"{subject} not delivered to {maildir}")


def test_aliases_deliver(imported):
    with SMTPFrom(imported.port("smtp"), "127.0.0.1") as s:
        for rcpt, subject in (("sales@example.com", "to-sales"),
                              ("first.last@example.com", "to-first-last"),
                              ("info@example.com", "to-info")):
            s.sendmail("someone@example.org", [rcpt],
                       f"From: someone@example.org\nSubject: {subject}\n\nhello\n")
    boxes = imported.data / "domains" / "example.com"
    wait_for_subject(boxes / "alice" / "Maildir", "to-sales")
    wait_for_subject(boxes / "bob" / "Maildir", "to-sales")
    wait_for_subject(boxes / "alice" / "Maildir", "to-first-last")
    wait_for_subject(boxes / "carol" / "Maildir", "to-info")


def test_the_copied_rules_relay_as_before(imported):
    def rcpt(ip):
        with SMTPFrom(imported.port("smtp"), ip) as s:
            s.ehlo("client.example")
            s.mail("someone@example.com")
            return s.rcpt("friend@example.org")
    assert rcpt("127.0.0.1")[0] == 250                     # RELAYCLIENT=""
    code, text = rcpt("127.0.0.2")                         # RBLSMTPD="-Blocked..."
    assert code == 553 and b"Blocked by the old rules" in text
    code, text = rcpt("127.0.0.3")                         # :allow, no RELAYCLIENT
    assert code == 553 and b"rcpthosts" in text


# --- interruption ---------------------------------------------------------------------------------

def state(data: Path, old_vpopmail: Path) -> dict:
    """What an import leaves: users (kind of hash), aliases, domains, every Maildir file
    (name, content, mtime) in the new tree, and what stays in the old Maildirs."""
    with sqlite3.connect(f"file:{data / 'users.sqlite'}?mode=ro", uri=True) as db:
        users = {(d, lo, "disabled" if h.startswith("!") else legacy.identify(h), q)
                 for d, lo, h, q in db.execute("SELECT domain, local, password_hash, quota "
                                               "FROM users")}
        aliases = set(db.execute("SELECT domain, local, targets FROM aliases"))
        domains = set(db.execute("SELECT name, postmaster FROM domains"))

    def files(root: Path) -> dict:
        out = {}
        for p in root.rglob("*"):
            if p.is_file() and "Maildir" in p.parts:
                out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
        return out
    return {"users": users, "aliases": aliases, "domains": domains,
            "new": files(data / "domains"), "old": files(old_vpopmail / "domains")}


def config_for(root: Path) -> Path:
    root.mkdir(parents=True)
    conf = root / "mailappliance.toml"
    conf.write_text(f'data = "{root / "var"}"\nbcrypt_cost = 4\n')
    return conf


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-reference")
    tree = sample_tree(root / "old-host")
    import_cmd(config_for(root / "new"), tree)
    return state(root / "new" / "var", tree.vpopmail)


# The sample's steps: 2 domains, 10 users, 3 aliases, then 10 messages: a kill in each phase,
# the last one after the last message (before the report).
@pytest.mark.parametrize("kill_after", [1, 7, 13, 16, 21, 25])
def test_an_import_killed_at_any_step_finishes_on_the_next_run(tmp_path, reference, kill_after):
    tree = sample_tree(tmp_path / "old-host")
    conf = config_for(tmp_path / "new")
    res = import_cmd(conf, tree, env={KILL_AFTER_ENV: str(kill_after)}, check_rc=None)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
    assert res.stdout == ""                            # killed before its report
    import_cmd(conf, tree)
    assert state(tmp_path / "new" / "var", tree.vpopmail) == reference
    again = import_cmd(conf, tree)
    assert "0 domains, 0 users (1 disabled), 0 aliases added; 0 messages moved" in again.stdout


def test_a_real_sigkill_while_mail_moves_loses_and_duplicates_nothing(tmp_path):
    names = [f"17000{i:05d}.{i}.mail.example.com" + (":2,S" if i % 2 else "")
             for i in range(3000)]
    tree = write_tree(tmp_path / "old-host", [TDomain("example.com", [TUser(
        "joe", messages=[Msg("cur" if ":" in n else "new", n) for n in names])])],
        control={"me": "mail.example.com\n"}, tcp_rules=":allow\n")
    conf = config_for(tmp_path / "new")
    new = tmp_path / "new" / "var" / "domains" / "example.com" / "joe" / "Maildir"
    cmd = [sys.executable, "-m", "mailappliance.cli", "--config", str(conf), "import", "qmail",
           *tree.args()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + IMPORT_TIMEOUT
    try:
        # Wait until the first messages have arrived, then kill -9 in the middle of the moves.
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(os.listdir(new / "cur")) + len(os.listdir(new / "new")) >= 50:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(IMPORT_TIMEOUT)
    moved = len(os.listdir(new / "cur")) + len(os.listdir(new / "new"))
    assert proc.returncode == -signal.SIGKILL and 0 < moved < len(names), moved
    res = import_cmd(conf, tree)
    assert res.returncode == 0, res.stdout
    placed = sorted(os.listdir(new / "new")) + sorted(os.listdir(new / "cur"))
    assert sorted(placed) == sorted(names)
    old = tree.vpopmail / "domains" / "example.com" / "joe" / "Maildir"
    assert os.listdir(old / "new") == [] and os.listdir(old / "cur") == []
