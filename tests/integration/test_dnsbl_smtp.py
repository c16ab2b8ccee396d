"""DNSBL end to end: the real `twistd -n mailappliance`, a real DNS server process, real clients.

Each 127.0.0.N is a client of its own (DESIGN.md), so one server serves every case: the rules
file and the zones give each source address its story. The verdict applies from MAIL on, as
rblsmtpd answers after HELO; the greeting is never delayed.
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from pathlib import Path

import pytest

from mailappliance.testing.dnsserver import DNSServerProcess
from tests.integration.server import ServerProcess

V6_NAME = "1." + "0." * 31          # ::1 reversed in nibbles (RFC 5782 section 2.4)

ZONES = {
    "bl.test": {
        "$minimum": 300,
        "2.0.0.127": [["A", "127.0.0.2"], ["TXT", "spam source, see http://bl.test/?127.0.0.2"]],
        "3.0.0.127": [["A", "127.0.0.2"]],
        "4.0.0.127": [["A", "127.0.0.2"], ["TXT", "listed but allow-listed"]],
        "5.0.0.127": [["A", "127.0.0.2"], ["TXT", "listed but RBLSMTPD empty"]],
        "12.0.0.127": [["A", "127.0.0.2"], ["TXT", "listed, and a list is dead"]],
        V6_NAME + "0": [["A", "127.0.0.2"]],     # placeholder, replaced below
    },
    "white.test": {"4.0.0.127": [["A", "127.0.0.2"]]},
    "dead.test": {},           # the DNS server never answers for this zone
    "broken.test": {},         # ... and answers SERVFAIL for this one
}
del ZONES["bl.test"][V6_NAME + "0"]
ZONES["bl.test"][V6_NAME.rstrip(".")] = [["A", "127.0.0.2"], ["TXT", "IPv6 loopback is listed"]]

RULES = """\
127.0.0.5:allow,RBLSMTPD=""
127.0.0.6:allow,RBLSMTPD="you are not welcome here"
127.0.0.7:allow,RBLSMTPD="-go away for good"
127.0.0.8:allow,RELAYCLIENT=""
:allow
"""

# DESIGN.md: a lookup that times out is given up after dnsbl_timeout; the issue allows the
# client one more second on top.
DNSBL_TIMEOUT = 1


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def dns_server():
    with DNSServerProcess(ZONES) as dns:
        dns.set_mode("drop", "dead.test")
        dns.set_mode("servfail", "broken.test")
        yield dns


def _start(root: Path, dns: DNSServerProcess, smtp: str) -> ServerProcess:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tcp.smtp").write_text(RULES)
    listen = ['"tcp:0:interface=127.0.0.1"']
    if ipv6_loopback():
        listen.append('"tcp6:0:interface=\\\\:\\\\:1"')
    config = (f'[smtp]\nrules = "{root / "tcp.smtp"}"\n{smtp}'
              f'\n[dns]\nnameservers = ["{dns.nameserver}"]\n'
              f'\n[listen]\nsmtp = [{", ".join(listen)}]\n'
              'submission = []\npop3 = []\n')
    srv = ServerProcess(root, config)
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")        # sessions end at RCPT, where the verdict applies
    srv.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    return srv.start()


@pytest.fixture(scope="module")
def server(tmp_path_factory, dns_server):
    srv = _start(tmp_path_factory.mktemp("dnsbl"), dns_server,
                 'dnsbl = ["bl.test"]\ndnsbl_allow = ["white.test"]\n')
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory, dns_server):
    """Lists that fail: one never answers, one answers SERVFAIL; plus bl.test."""
    srv = _start(tmp_path_factory.mktemp("dnsbl-slow"), dns_server,
                 'dnsbl = ["dead.test", "broken.test", "bl.test"]\n'
                 f"dnsbl_timeout = {DNSBL_TIMEOUT}\n")
    yield srv
    srv.stop()


def session(srv: ServerProcess, source: str, port_index: int = 0):
    """Greeting, EHLO, MAIL, RCPT: returns (RCPT reply code, text, seconds from connect to it,
    the reply to a second RCPT). MAIL is always accepted: as rblsmtpd, the verdict applies at
    RCPT."""
    port = srv.ports["smtp"][port_index]
    host = "::1" if ":" in source else "127.0.0.1"
    started = time.monotonic()
    with smtplib.SMTP(timeout=30, source_address=(source, 0)) as c:
        code, _ = c.connect(host, port)
        assert code == 220
        assert time.monotonic() - started < 1.0          # the greeting is never delayed
        c.ehlo("client.example")
        assert c.mail("someone@example.org")[0] == 250
        code, text = c.rcpt("test@test.com")
        elapsed = time.monotonic() - started
        second = c.rcpt("test@test.com")[0] if code >= 400 else None
        if code >= 400:
            assert c.docmd("DATA")[0] in (503, 554)      # no recipient, no message
        c.quit()
    # The reply may carry an enhanced status code (RFC 3463) before rblsmtpd's text.
    return code, re.sub(r"^[245]\.\d{1,3}\.\d{1,3} ", "", text.decode()), elapsed, second


def server_log(srv: ServerProcess) -> str:
    parts = [srv.output()]
    for path in sorted(srv.root.rglob("*")):
        if path.is_file() and "log" in path.parts and path.suffix != ".sqlite":
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def wait_for_log(srv: ServerProcess, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server_log(srv)
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in the server's log:\n{server_log(srv)[-3000:]}")


def test_listed_client_gets_451_with_the_txt_reason_at_rcpt(server):
    code, text, _, rcpt = session(server, "127.0.0.2")
    assert (code, text) == (451, "spam source, see http://bl.test/?127.0.0.2")
    assert rcpt is not None and rcpt >= 400          # refused for every command after it
    wait_for_log(server, "rblsmtpd: 127.0.0.2 bl.test: 451 spam source")


def test_not_listed_client_is_served(server):
    code, _, _, _ = session(server, "127.0.0.1")
    assert code == 250


def test_listing_without_txt_gets_a_reason_naming_the_list(server):
    code, text, _, _ = session(server, "127.0.0.3")
    assert code == 451 and "bl.test" in text


def test_allowlisted_client_is_served_despite_a_listing(server):
    assert session(server, "127.0.0.4")[0] == 250


def test_rblsmtpd_empty_skips_the_lists(server, dns_server):
    before = dns_server.count("5.0.0.127.bl.test")
    assert session(server, "127.0.0.5")[0] == 250
    assert dns_server.count("5.0.0.127.bl.test") == before == 0


def test_rblsmtpd_text_refuses_451(server):
    code, text, _, _ = session(server, "127.0.0.6")
    assert (code, text) == (451, "you are not welcome here")


def test_rblsmtpd_dash_text_refuses_553(server):
    code, text, _, _ = session(server, "127.0.0.7")
    assert (code, text) == (553, "go away for good")


def test_relay_clients_are_checked_too(server, dns_server):
    assert session(server, "127.0.0.8")[0] == 250
    assert dns_server.count("8.0.0.127.bl.test", "A") == 1


def test_ipv6_client_is_looked_up_by_nibbles(server):
    if len(server.ports["smtp"]) < 2:
        pytest.fail("IPv6 loopback is not available on this machine") if ipv6_loopback() \
            else pytest.skip("no IPv6 loopback here")
    code, text, _, _ = session(server, "::1", port_index=1)
    assert (code, text) == (451, "IPv6 loopback is listed")


def test_ten_connections_from_one_address_cost_one_lookup(server, dns_server):
    for _ in range(10):
        assert session(server, "127.0.0.10")[0] == 250
    assert dns_server.count("10.0.0.127.bl.test", "A") == 1
    assert dns_server.count("10.0.0.127.white.test", "A") == 1


def test_a_list_that_never_answers_costs_at_most_dnsbl_timeout(slow_server):
    code, _, elapsed, _ = session(slow_server, "127.0.0.11")
    assert code == 250                                  # fail open
    assert elapsed < DNSBL_TIMEOUT + 1, elapsed
    wait_for_log(slow_server, "rblsmtpd: 127.0.0.11 dead.test: lookup error")


def test_servfail_fails_open_and_is_logged(slow_server):
    assert session(slow_server, "127.0.0.13")[0] == 250
    wait_for_log(slow_server, "rblsmtpd: 127.0.0.13 broken.test: lookup error")


def test_failing_lists_do_not_hide_a_listing_in_another(slow_server):
    code, text, elapsed, _ = session(slow_server, "127.0.0.12")
    assert (code, text) == (451, "listed, and a list is dead")
    assert elapsed < DNSBL_TIMEOUT + 1, elapsed
