"""The real server's log: files under data/log rotated by size keeping `keep` files, one line
per event with an area prefix, nothing secret; stdout-only and journald modes."""

from __future__ import annotations

import poplib
import re
import smtplib

from tests.integration.opstools import (admin, admin_connect, log_text, read_replies,
                                        wait_for, wait_for_log)

PASSWORD = "L0gged-Never!"
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (smtp|delivery|pop3|admin|dns|server): ")


def test_rotation_by_size_keeps_keep_files(make_server):
    srv = make_server("[log]\nrotate_bytes = 4096\nkeep = 3\n").start()
    with admin_connect(srv) as s:
        s.sendall(b"relay list\n" * 600)            # ~600 log lines of ~60 bytes
        read_replies(s, 600)
        s.sendall(b"domain list\n")
        read_replies(s, 1)
    # Lines reach the file up to a flush interval after their replies: once the last
    # command's line is there, the server writes and rotates no more and the files hold still.
    wait_for_log(srv, "domain list: ok")
    logdir = srv.data / "log"

    def rotated():
        names = sorted(p.name for p in logdir.iterdir())
        return len(names) == 3 and names
    names = wait_for(rotated, what="3 log files")
    assert names[-1] == "current"
    assert all(re.fullmatch(r"@[0-9a-f]{24}\.s", n) for n in names[:-1])
    for p in logdir.iterdir():
        data = p.read_bytes()
        assert len(data) <= 4096
        assert data.endswith(b"\n")
        for line in data.decode().splitlines():
            assert LINE.match(line), line
    # More rotations happened than files were kept: the oldest went away.
    text = log_text(srv)
    assert "server: ready:" not in text               # start-up lines rotated out long ago
    assert text.count("relay list: ok") < 600


def test_events_carry_their_area_and_secrets_never_reach_the_log(make_server):
    srv = make_server('default_domain = "test.com"\n')
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
    srv.start()
    admin(srv, f"user passwd test@test.com\n{PASSWORD}\n", count=1)
    # a failed and a good POP3 login, an SMTP session
    pop = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20)
    pop.user("test")
    try:
        pop.pass_(PASSWORD + "wrong")
    except poplib.error_proto:
        pass
    pop.quit()
    pop = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=20)
    pop.user("test")
    pop.pass_(PASSWORD)
    pop.quit()
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=20) as s:
        s.ehlo("client.test")
        s.mail("a@example.org")
        s.rcpt("nobody-here@test.com")

    def logged():
        text = log_text(srv)
        return (re.search(r"Z pop3: .*login failed: rip=127\.0\.0\.1 ", text)
                and re.search(r"Z smtp: .*nobody-here@test\.com", text) and text)
    text = wait_for(logged, what="pop3 and smtp events in the log")
    for line in text.splitlines():
        assert LINE.match(line) or " traceback: " in line, line
    assert " server: " in text and " admin: " in text
    secrets = [PASSWORD, PASSWORD + "wrong"]
    for secret in secrets:
        assert secret not in text
        assert secret not in srv.output()


def test_stdout_mode_writes_no_files(make_server):
    srv = make_server("[log]\nstdout = true\n").start()
    admin(srv, "relay list\n")
    wait_for(lambda: "relay list: ok" in srv.stdout(), what="event on stdout")
    assert not (srv.data / "log").exists()
    [(ok, lines)] = admin(srv, "stat\n")
    assert ok and "last errors: none" in lines


def test_journal_observer_gives_priority_and_area_and_leaves_the_mail_log_to_files(make_server):
    srv = make_server(twistd_args=["--logger=mailappliance.logging.journal"]).start()
    admin(srv, "relay list\nfrobnicate\n", count=2)
    srv.stop()
    out = srv.stdout().splitlines()
    assert any(re.fullmatch(r"<6>server: ready: .*", l) for l in out)
    assert all(re.match(r"<[2-7]>(smtp|delivery|pop3|admin|dns|server): ", l) for l in out), out
    # while the file log runs, routine admin events stay out of the journal
    assert not any("relay list" in l for l in out)
    assert "relay list: ok" in log_text(srv)


def test_plain_twistd_stdout_keeps_health_lines_and_leaves_the_mail_log_to_files(make_server):
    srv = make_server().start()
    admin(srv, "relay list\nfrobnicate\n", count=2)
    wait_for(lambda: "relay list: ok" in log_text(srv), what="admin event in the files")
    srv.stop()
    out = srv.stdout()
    assert "ready" in out                       # server events stay on standard output
    assert "relay list" not in out              # routine mail-log events are in the files only
    assert "relay list: ok" in log_text(srv)
