"""The fail2ban filter shipped in conf/ against a log the real server wrote: Debian's
`fail2ban-regex` must match every failed SMTP AUTH and POP3 login, with its client address,
and no successful one. Under CI=true a missing fail2ban-regex fails the test."""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import require_tool
from tests.integration.opstools import log_text, wait_for

CONF = Path(__file__).resolve().parents[2] / "conf" / "fail2ban"
PASSWORD = "Passw0rd!"
# Each failing client has an address of its own (the server's penalty grows per address).
SMTP_FAIL = {"127.0.0.21": "PLAIN", "127.0.0.22": "LOGIN"}
POP3_FAIL = ["127.0.0.23", "127.0.0.24"]
SMTP_OK, POP3_OK = "127.0.0.25", "127.0.0.26"
TIMEOUT = 30


def smtp_login(port: int, ip: str, password: str, mech: str = "PLAIN") -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT, source_address=(ip, 0)) as c:
        c.ehlo("client.test")
        c.user, c.password = "test@test.com", password
        authobject = {"PLAIN": c.auth_plain, "LOGIN": c.auth_login}[mech]
        try:
            code, _ = c.auth(mech, authobject, initial_response_ok=mech == "PLAIN")
        except smtplib.SMTPAuthenticationError as e:
            code = e.smtp_code
        return code


def pop3_login(port: int, ip: str, password: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                  source_address=(ip, 0)) as s:
        f = s.makefile("rwb")
        f.readline()
        f.write(b"USER test\r\n")
        f.flush()
        f.readline()
        f.write(b"PASS " + password.encode() + b"\r\n")
        f.flush()
        answer = f.readline()
        f.write(b"QUIT\r\n")
        f.flush()
        f.readline()
        return answer


def test_fail2ban_regex_matches_every_failed_login_and_no_success(make_server):
    regex = require_tool("fail2ban-regex")
    srv = make_server('default_domain = "test.com"\n'
                      "[submission]\nauth_plaintext_loopback = true\n")
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
    srv.start()
    sub, pop = srv.port("submission"), srv.port("pop3")
    with ThreadPoolExecutor(8) as pool:          # each failure waits out its penalty
        fails = [pool.submit(smtp_login, sub, ip, "wrong", mech) for ip, mech in SMTP_FAIL.items()]
        fails += [pool.submit(pop3_login, pop, ip, "wrong") for ip in POP3_FAIL]
        oks = [pool.submit(smtp_login, sub, SMTP_OK, PASSWORD),
               pool.submit(pop3_login, pop, POP3_OK, PASSWORD)]
        assert [f.result() for f in fails] == [535, 535, b"-ERR authorization failed\r\n",
                                              b"-ERR authorization failed\r\n"]
        assert [f.result() for f in oks][0] == 235
        assert oks[1].result().startswith(b"+OK")
    wait_for(lambda: log_text(srv).count(" failed: rip=") == 4 and
             f"rip={SMTP_OK} " in log_text(srv) and f"rip={POP3_OK} " in log_text(srv),
             what="the login lines in the log")
    srv.stop()
    log = srv.data / "log" / "current"
    # The same field order in success and failure lines: rip first, then the fields both
    # have in the same order (an operator's grep or awk reads both alike).
    text = log.read_text()
    for ok, failed in (("smtp: auth ok: ", "smtp: auth failed: "),
                       ("pop3: login ok: ", "pop3: login failed: ")):
        [ok_keys] = {tuple(re.findall(r" (\w[\w-]*)=", " " + l.split(ok, 1)[1]))
                     for l in text.splitlines() if ok in l}
        [failed_keys] = {tuple(re.findall(r" (\w[\w-]*)=", " " + l.split(failed, 1)[1]))
                         for l in text.splitlines() if failed in l}
        assert ok_keys[0] == failed_keys[0] == "rip", (ok_keys, failed_keys)
        assert [k for k in ok_keys if k in failed_keys] == \
            [k for k in failed_keys if k in ok_keys], (ok_keys, failed_keys)
        assert len(set(ok_keys) & set(failed_keys)) >= 3, (ok_keys, failed_keys)
    res = subprocess.run([regex, "--print-all-matched", str(log),
                          str(CONF / "filter.d" / "mailappliance.conf")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 4 matched, \d+ missed", out, re.M), out
    matched = re.findall(r"^\|\s+(\S+Z \w+: .*)$", out, re.M)
    assert sorted(re.search(r"rip=(\S+)", m).group(1) for m in matched) == sorted(
        [*SMTP_FAIL, *POP3_FAIL]), out
    assert not any(ok in m for m in matched for ok in (SMTP_OK, POP3_OK))
    # The date is read (not guessed), and each failure is counted once.
    assert "Date template hits:" in out and "[0] {^LN-BEG}" not in out
    assert re.search(r"^\|\s+1\) \[2\] \S+smtp: auth failed", out, re.M), out
    assert re.search(r"^\|\s+2\) \[2\] \S+pop3: login failed", out, re.M), out


def test_the_jail_loads_with_debians_fail2ban_configuration(tmp_path):
    """conf/fail2ban/jail.d installed beside Debian's /etc/fail2ban: `fail2ban-client -d`
    (the configuration as the server would load it) starts a mailappliance jail with the
    filter's expressions, the date pattern, the mail ports and the ban settings."""
    import shutil
    client = require_tool("fail2ban-client")
    etc = Path("/etc/fail2ban")
    assert (etc / "jail.conf").exists(), "Debian's fail2ban package installs /etc/fail2ban"
    conf = tmp_path / "fail2ban"
    shutil.copytree(etc, conf)
    shutil.copy(CONF / "filter.d" / "mailappliance.conf", conf / "filter.d")
    log = tmp_path / "current"
    log.write_text("")
    (conf / "jail.d" / "mailappliance.conf").write_text(
        (CONF / "jail.d" / "mailappliance.conf").read_text()
        .replace("/var/lib/mailappliance/log/current", str(log)))
    res = subprocess.run([client, "-c", str(conf), "-d"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "['add', 'mailappliance', 'auto']" in out and "['start', 'mailappliance']" in out
    assert ("['multi-set', 'mailappliance', 'addfailregex', "
            "['^\\\\s*smtp: auth failed: rip=<HOST> user=', "
            "'^\\\\s*pop3: login failed: rip=<HOST> user=']]") in out, out
    assert f"['set', 'mailappliance', 'addlogpath', '{log}', 'head']" in out
    assert "['set', 'mailappliance', 'maxretry', 5]" in out
    assert "--dports smtp,submission,submissions,pop3,pop3s" in out
    assert "ERROR" not in res.stderr, res.stderr
