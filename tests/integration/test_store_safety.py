"""The store commands' refusals through the real server and the real command: an address is
a user or an alias, never both (and an old collision gives no one a way to send as the user);
`domain del` keeps stored mail unless --force; the admin socket answers a client that
half-closes (`printf 'stat\\n' | socat - UNIX-CONNECT:...`)."""

from __future__ import annotations

import smtplib
import sqlite3
import subprocess

import pytest

from tests.conftest import require_tool
from tests.integration.opstools import admin, wait_for

PW = "Passw0rd!\n"
# socat waits this long for the server to close after its own EOF; the subprocess timeout
# below is shorter, so a server that answers but never closes fails the test.
SOCAT_WAIT = 60
SOCAT_TIMEOUT = 30


@pytest.fixture
def srv(make_server):
    s = make_server('default_domain = "test.com"\n[submission]\nauth_plaintext_loopback = true\n')
    s.root.mkdir(parents=True, exist_ok=True)
    s._write_config()
    s.cli("domain", "add", "test.com")
    s.cli("user", "add", "test@test.com", "--password-stdin", input=PW)
    return s.start()


def one_line_refusal(res, text):
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and text in res.stderr, res.stderr


def test_user_and_alias_collisions_are_refused_both_ways(srv):
    srv.cli("alias", "add", "info@test.com", "test@test.com")
    one_line_refusal(srv.cli("user", "add", "info@test.com", "--password-stdin", input=PW,
                             check=False), "info@test.com is an alias (-> test@test.com)")
    one_line_refusal(srv.cli("alias", "add", "test@test.com", "x@example.org", check=False),
                     "test@test.com is a user")
    # the admin protocol refuses the same
    [(ok, lines)] = admin(srv, f"user add info@test.com\n{PW}", count=1)
    assert not ok and "is an alias" in lines[0]
    [(ok, lines)] = admin(srv, "alias add test@test.com x@example.org\n")
    assert not ok and "is a user" in lines[0]


def test_an_old_collision_is_shown_and_gives_no_way_to_send_as_the_user(srv):
    srv.cli("user", "add", "boss@test.com", "--password-stdin", input=PW)
    # An alias written beside the user, as older versions allowed.
    db = sqlite3.connect(srv.data / "users.sqlite")
    with db:
        db.execute("INSERT INTO aliases(domain, local, targets) VALUES "
                   "('test.com', 'boss', '[\"test@test.com\"]')")
    db.close()
    listing = srv.cli("alias", "list").stdout
    assert "boss@test.com -> test@test.com (unused: boss@test.com is a user" in listing
    [(ok, lines)] = admin(srv, "alias list\n")
    assert any(line.startswith("boss@test.com -> test@test.com (unused") for line in lines)
    with smtplib.SMTP("127.0.0.1", srv.port("submission"), timeout=30) as s:
        s.login("test@test.com", PW.strip())
        code, text = s.mail("boss@test.com")
        assert code == 553, text                   # the dead alias no longer lets test@ in
        s.rset()
        assert s.mail("test@test.com")[0] == 250


def test_domain_del_keeps_mail_unless_forced(srv):
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as s:
        s.sendmail("a@example.org", ["test@test.com"], b"Subject: keep me\r\n\r\nx\r\n")
    new = srv.data / "domains" / "test.com" / "test" / "Maildir" / "new"
    wait_for(lambda: list(new.iterdir()), what="delivery")
    one_line_refusal(srv.cli("domain", "del", "test.com", check=False),
                     "domain test.com has 1 message in its mailboxes; "
                     "`domain del test.com --force` deletes it too")
    [(ok, lines)] = admin(srv, "domain del test.com\n")
    assert not ok and "has 1 message" in lines[0]
    assert list(new.iterdir())
    assert srv.cli("domain", "list").stdout == "test.com\n"
    res = srv.cli("domain", "del", "test.com", "--force")
    assert res.stdout == "domain test.com deleted with 1 message\n"
    assert not (srv.data / "domains" / "test.com").exists()
    assert srv.cli("domain", "list").stdout == ""


def test_admin_domain_del_force_over_the_socket(srv):
    srv.cli("domain", "add", "other.example")
    [(ok, lines)] = admin(srv, "domain del other.example --force\n")
    assert ok and lines == ["domain other.example deleted"]


def test_socat_half_close_gets_the_answer_then_the_connection_closes(srv):
    socat = require_tool("socat")
    sock = srv.data / "admin.sock"
    res = subprocess.run(f"printf 'stat\\ndomain list\\n' | {socat} -t {SOCAT_WAIT} - "
                         f"UNIX-CONNECT:{sock}", shell=True, capture_output=True, text=True,
                         timeout=SOCAT_TIMEOUT)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines.count(".") == 2, res.stdout
    assert any("smtp" in line for line in lines) and "test.com" in lines
    # the exact line from the issue, with socat's default 0.5 s wait after its EOF
    res = subprocess.run(f"printf 'stat\\n' | {socat} - UNIX-CONNECT:{sock}", shell=True,
                         capture_output=True, text=True, timeout=SOCAT_TIMEOUT)
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == ".", res.stdout
