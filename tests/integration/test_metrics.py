"""[listen] metrics: the real server's /metrics scraped over loopback and read with the
Prometheus client library's own parser; the counters match what happened and `stat`."""

from __future__ import annotations

import json
import poplib
import smtplib
import ssl
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.opstools import log_text, wait_for
from tests.integration.test_fail2ban import pop3_login
from tests.integration.test_pop3_server import PASSWORD, start_with_user, tls_config
from tests.pop3_support import make_cert


def scrape(srv, path="/metrics") -> dict:
    """{(name, frozenset(labels)): value} of one scrape."""
    port = srv.port("metrics")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def test_metrics_count_what_happened(make_server, tmp_path):
    cert, key = make_cert(tmp_path / "tls")
    srv = make_server(tls_config(cert, key, "[submission]\nauth_plaintext_loopback = true")
                      + 'metrics = ["tcp:0:interface=127.0.0.1"]\n')
    start_with_user(srv)
    before = scrape(srv)
    assert value(before, "mailappliance_up") == 1
    assert value(before, "mailappliance_messages_committed_total") == 0
    # A message delivered, a failed AUTH over STARTTLS, a failed POP3 login, one good one.
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as c:
        c.sendmail("a@example.org", ["test@test.com"], b"Subject: m\r\n\r\nbody\r\n")
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False          # 127.0.0.1; the certificate names mx.test.example
    # Each client from an address of its own: the login penalty grows per address.
    with smtplib.SMTP("127.0.0.1", srv.port("submission"), timeout=30,
                      source_address=("127.0.0.31", 0)) as c:
        c.starttls(context=ctx)
        c.ehlo("client.test")
        c.user, c.password = "test@test.com", "wrong"
        try:
            c.auth("PLAIN", c.auth_plain)
        except smtplib.SMTPAuthenticationError:
            pass
    assert pop3_login(srv.port("pop3"), "127.0.0.32", "wrong").startswith(b"-ERR")
    p = poplib.POP3_SSL("127.0.0.1", srv.port("pop3s"), context=ctx, timeout=30)
    p.user("test")
    p.pass_(PASSWORD)
    p.quit()
    wait_for(lambda: "end msg" in log_text(srv) and log_text(srv).count(" failed: rip=") == 2,
             what="delivery and the failed logins in the log")
    m = scrape(srv)
    assert value(m, "mailappliance_messages_committed_total") == 1
    assert value(m, "mailappliance_deliveries_total", result="success") == 1
    assert value(m, "mailappliance_deliveries_total", result="deferral") == 0
    assert value(m, "mailappliance_failed_logins_total", protocol="smtp") == 1
    assert value(m, "mailappliance_failed_logins_total", protocol="pop3") == 1
    assert value(m, "mailappliance_tls_handshakes_total") == 2      # STARTTLS and pop3s
    assert value(m, "mailappliance_queue_messages") == 0
    assert value(m, "mailappliance_queue_oldest_message_age_seconds") == 0
    assert value(m, "mailappliance_delivery_slots", channel="remote") == 20
    assert value(m, "mailappliance_dns_timeouts_total") == 0
    # The connection counters agree with `stat --json`.
    doc = json.loads(srv.cli("stat", "--json").stdout)
    for svc in doc["services"]:
        if svc["kind"] in ("smtp", "submission", "pop3", "pop3s"):
            assert value(m, "mailappliance_connections_total", kind=svc["kind"]) == \
                svc["connections_total"] >= 1
    assert value(m, "mailappliance_connections_total", kind="metrics") == 2   # two scrapes
    # Only /metrics; scrapes leave no line in the mail log.
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port('metrics')}/", timeout=30)
        raise AssertionError("/ answered")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    assert "GET /metrics" not in log_text(srv) and "Starting factory" not in log_text(srv)
