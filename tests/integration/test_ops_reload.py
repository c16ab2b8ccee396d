"""Reload on the real server: a good rules/config change applies to the next client at once; a
bad one is refused with its reason and the old configuration keeps working (reload and HUP)."""

from __future__ import annotations

import signal
import smtplib

import pytest

from tests.integration.opstools import admin, wait_for

RELAY_RULES = '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'
NO_RELAY_RULES = '127.0.0.1:allow\n:allow\n'


def relay_reply(server) -> int:
    """RCPT to a domain that is not ours, from 127.0.0.1: 250 if we may relay, else 553."""
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=20) as s:
        s.ehlo("client.test")
        s.mail("someone@test.com")
        code, _ = s.rcpt("far@example.org")
        s.rset()
        return code


@pytest.fixture
def ruled(make_server):
    srv = make_server()
    srv.root.mkdir(parents=True, exist_ok=True)
    rules = srv.root / "tcp.smtp"
    rules.write_text(RELAY_RULES)
    srv.config_text = f'default_domain = "test.com"\n[smtp]\nrules = "{rules}"\n'
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.start()
    srv.rules_path = rules
    return srv


def stat_rules_line(server) -> str:
    return next(l for l in server.cli("stat").stdout.splitlines() if l.startswith("rules: "))


def test_good_reload_applies_new_rules_to_the_next_client(ruled):
    assert relay_reply(ruled) == 250
    assert stat_rules_line(ruled) == f"rules: 2 rules from {ruled.rules_path}"
    ruled.rules_path.write_text(NO_RELAY_RULES)
    res = ruled.cli("reload")
    assert res.stdout.splitlines() == [f"configuration reloaded from {ruled.config_path}",
                                       f"2 rules from {ruled.rules_path}"]
    assert relay_reply(ruled) == 553


def test_bad_rules_file_is_refused_by_the_server_and_the_old_rules_stay(ruled):
    ruled.rules_path.write_text('127.0.0.1:allow,RELAYCLIENT=""\n999.1.2.3:allow\n')
    [(ok, lines)] = admin(ruled, "reload\n")               # the server's own refusal
    assert not ok
    assert lines == [f"error: reload refused: {ruled.rules_path}: line 2: octet out of range "
                     "in '999.1.2.3'; the old configuration stays in force"]
    assert relay_reply(ruled) == 250                         # still the old rules
    [(ok, lines)] = admin(ruled, "stat\n")
    assert f"rules: 2 rules from {ruled.rules_path}" in lines
    # The command parses the file first and says the same without bothering the server.
    res = ruled.cli("reload", check=False)
    assert res.returncode == 1
    assert res.stderr == ("mailappliance: " + lines_error_text(ruled) + "\n")


def lines_error_text(ruled) -> str:
    return (f"reload refused: {ruled.rules_path}: line 2: octet out of range in '999.1.2.3'; "
            "the old configuration stays in force")


def test_bad_config_file_is_refused_and_the_server_keeps_running(ruled):
    good = ruled.config_path.read_text()
    ruled.config_path.write_text(good + "\n[pop3]\nroaming_relay_minutes = -5\n")
    res = ruled.cli("reload", check=False)
    assert res.returncode == 1
    assert res.stderr == (f"mailappliance: reload refused: {ruled.config_path}: "
                          "pop3.roaming_relay_minutes: must be at least 0, got -5; "
                          "the old configuration stays in force\n")
    ruled.config_path.write_text(good)
    assert ruled.cli("reload").returncode == 0


def test_sighup_reloads_and_a_bad_file_on_hup_is_logged_not_fatal(ruled):
    log = ruled.data / "log" / "current"
    ruled.rules_path.write_text(NO_RELAY_RULES)
    ruled.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "admin: reload (SIGHUP): configuration reloaded" in log.read_text(),
             what="HUP reload in the log")
    assert relay_reply(ruled) == 553
    ruled.config_path.write_text("this is not toml [\n")
    ruled.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "admin: reload (SIGHUP) refused, the old configuration stays in force: "
             in log.read_text(), what="refused HUP reload in the log")
    assert ruled.proc.poll() is None
    assert relay_reply(ruled) == 553
