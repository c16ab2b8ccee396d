"""[listen] metrics: the real server's /metrics scraped over loopback and read with the
Prometheus client library's own parser; every counter and gauge matches what happened and
what `stat --json` says (connections, messages committed, deliveries by result, queue size
and oldest message, DNS lookups and timeouts, failed logins, TLS handshakes)."""

from __future__ import annotations

import json
import poplib
import smtplib
import socket
import ssl
import urllib.error
import urllib.request

import pytest

from prometheus_client.parser import text_string_to_metric_families

from mailappliance.testing.dnsserver import DNSServerProcess
from tests.integration.delivery_support import closed_port
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


# For the DNS counters: the DNSBL bl.test answers (NXDOMAIN: not listed); dead.test's name
# server never answers, so the MX lookup for a message to it times out (one try of the
# resolver's, 5 s, glibc's RES_TIMEOUT) while the rest of the test goes on, and dead.test as
# a DNSBL is cut at DNSBL_TIMEOUT (the DNSBL counters).
DNS_ZONES = {"bl.test": {"$minimum": 300}, "dead.test": {}}
DNSBL_TIMEOUT = 1


def stat_values(doc: dict) -> dict:
    """{(metric name, labels): value} of what `stat --json` says, named as the metrics."""
    c = doc["counters"]
    out = {("mailappliance_messages_committed_total", ()): c["queue"]["commits"],
           ("mailappliance_queue_write_errors_total", ()): c["queue"]["write_errors"],
           ("mailappliance_queue_messages", ()): doc["queue"]["messages"],
           ("mailappliance_queue_oldest_message_age_seconds", ()):
               doc["queue"]["oldest_age_seconds"] or 0,
           ("mailappliance_dns_lookups_total", ()): c["dns"]["lookups"],
           ("mailappliance_dns_cache_hits_total", ()): c["dns"]["cache_hits"],
           ("mailappliance_dns_timeouts_total", ()): c["dns"]["timeouts"],
           ("mailappliance_dns_failures_total", ()): c["dns"]["failures"],
           ("mailappliance_tls_handshakes_total", ()): c["tls"]["handshakes"],
           ("mailappliance_dnsbl_checks_total", ()): c["dnsbl"]["checks"],
           ("mailappliance_dnsbl_refusals_total", ()): c["dnsbl"]["refusals"],
           ("mailappliance_dnsbl_timeouts_total", ()): c["dnsbl"]["timeouts"]}
    for result in ("success", "deferral", "failure"):
        out[("mailappliance_deliveries_total", (("result", result),))] = \
            c["deliveries"][result]
    for protocol, n in c["failed_logins"].items():
        out[("mailappliance_failed_logins_total", (("protocol", protocol),))] = n
    for svc in doc["services"]:
        labels = (("kind", svc["kind"]),)
        out[("mailappliance_connections_total", labels)] = svc["connections_total"]
    for channel in ("local", "remote"):
        labels = (("channel", channel),)
        out[("mailappliance_delivery_slots", labels)] = doc["queue"][f"{channel}_max"]
    out[("mailappliance_queue_in_memory", ())] = doc["queue"]["in_memory"]
    out[("mailappliance_queue_backlog", ())] = doc["queue"]["backlog"]
    out[("mailappliance_dead_destinations", ())] = len(doc["queue"]["dead"])
    return out


def test_metrics_count_what_happened_and_match_stat(make_server, tmp_path):
    cert, key = make_cert(tmp_path / "tls")
    rules = tmp_path / "tcp.smtp"
    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
    with DNSServerProcess(DNS_ZONES) as dns:
        dns.set_mode("drop", "dead.test")
        srv = make_server(tls_config(cert, key, (
            "[submission]\nauth_plaintext_loopback = true\n"
            f'[smtp]\nrules = "{rules}"\ndnsbl = ["bl.test", "dead.test"]\n'
            f"dnsbl_timeout = {DNSBL_TIMEOUT}\n"
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
            f'[routes]\n"example.org" = "127.0.0.1:{closed_port()}"\n'))
            + 'metrics = ["tcp:0:interface=127.0.0.1"]\n')
        start_with_user(srv)
        run_the_day(srv, cert)

        # Everything `stat --json` counts, the metrics count alike: a scrape before and one
        # after the stat hold it between them (a retry may come in between).
        first = scrape(srv)
        doc = json.loads(srv.cli("stat", "--json").stdout)
        second = scrape(srv)
    expected = stat_values(doc)
    for (name, labels), said in expected.items():
        key = (name, frozenset(labels))
        assert first[key] <= said <= second[key], (name, labels, first[key], said, second[key])
    # ... and what happened: three messages committed, one delivered, two deferred (still
    # queued), one failed login each, two TLS handshakes, the lookups and a timeout.
    assert value(first, "mailappliance_messages_committed_total") == 3
    assert value(first, "mailappliance_deliveries_total", result="success") == 1
    assert value(first, "mailappliance_deliveries_total", result="deferral") >= 1
    assert value(first, "mailappliance_deliveries_total", result="failure") == 0
    assert value(first, "mailappliance_failed_logins_total", protocol="smtp") == 1
    assert value(first, "mailappliance_failed_logins_total", protocol="pop3") == 1
    assert value(first, "mailappliance_tls_handshakes_total") == 2      # STARTTLS and pop3s
    assert value(first, "mailappliance_queue_messages") == 2
    assert doc["queue"]["oldest_age_seconds"] is not None
    assert value(first, "mailappliance_dns_lookups_total") >= 2
    assert value(first, "mailappliance_dns_timeouts_total") >= 1
    # each SMTP client looked up in both lists, dead.test's lookup cut at the deadline
    checks = int(value(first, "mailappliance_dnsbl_checks_total"))
    assert checks >= 1 and value(first, "mailappliance_dnsbl_refusals_total") == 0
    assert value(first, "mailappliance_dnsbl_timeouts_total") == checks
    assert value(first, "mailappliance_delivery_slots", channel="remote") == 20
    for kind in ("smtp", "submission", "pop3", "pop3s"):
        assert value(first, "mailappliance_connections_total", kind=kind) >= 1
    # The metrics listener counts its own connections like every listener.
    assert value(second, "mailappliance_connections_total", kind="metrics") == \
        value(first, "mailappliance_connections_total", kind="metrics") + 1
    # The text `stat` says the same.
    text = srv.cli("stat").stdout
    assert "failed logins since start: 1 smtp, 1 pop3" in text
    assert "tls handshakes since start: 2" in text
    assert "oldest message in queue: " in text
    assert f"dnsbl since start: {checks} clients checked, 0 refused, {checks} lookups cut" in text
    # Only /metrics; scrapes leave no line in the mail log.
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port('metrics')}/", timeout=30)
        raise AssertionError("/ answered")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    assert "GET /metrics" not in log_text(srv) and "Starting factory" not in log_text(srv)


def run_the_day(srv, cert) -> None:
    """A message delivered, one deferred (connection refused), one whose MX lookup times
    out, a failed AUTH over STARTTLS, a failed POP3 login,
    a good one over pop3s; returns when the log shows them all."""
    before = scrape(srv)
    assert value(before, "mailappliance_up") == 1
    assert value(before, "mailappliance_messages_committed_total") == 0
    assert value(before, "mailappliance_queue_oldest_message_age_seconds") == 0
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as c:
        c.sendmail("a@example.org", ["test@test.com"], b"Subject: m\r\n\r\nbody\r\n")
        c.sendmail("test@test.com", ["far@example.org"], b"Subject: far\r\n\r\nbody\r\n")
        c.sendmail("test@test.com", ["x@dead.test"], b"Subject: dead\r\n\r\nbody\r\n")
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
    wait_for(lambda: "end msg" in log_text(srv) and "deferral" in log_text(srv)
             and log_text(srv).count(" failed: rip=") == 2,
             what="delivery, the deferral and the failed logins in the log")
    wait_for(lambda: value(scrape(srv), "mailappliance_dns_timeouts_total") >= 1,
             timeout=60, what="the MX lookup that timed out")


def test_metrics_connections_are_bounded_and_a_client_that_never_reads_costs_little(
        make_server):
    """At most METRICS_MAX_CONNECTIONS at once: the next gets a 503 and SMTP is untouched;
    a client pipelining scrapes without reading holds the server to a bounded backlog."""
    from mailappliance.descriptors import METRICS_MAX_CONNECTIONS
    from tests.integration.test_hostile_peers import RSS_GROWTH_BOUND, flood, rss
    srv = make_server('[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\nsubmission = []\n'
                      'pop3 = []\nmetrics = ["tcp:0:interface=127.0.0.1"]\n').start()
    port = srv.port("metrics")
    scrape(srv)                                            # warm up
    held = [socket.create_connection(("127.0.0.1", port), timeout=30)
            for _ in range(METRICS_MAX_CONNECTIONS)]
    try:
        def metrics_now():
            services = json.loads(srv.cli("stat", "--json").stdout)["services"]
            return next(x["connections_now"] for x in services if x["kind"] == "metrics")
        wait_for(lambda: metrics_now() == METRICS_MAX_CONNECTIONS, what="the held connections")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30)
        assert refused.value.code == 503
        with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as c:
            assert c.noop()[0] == 250
    finally:
        for s in held:
            s.close()
    wait_for(lambda: value(scrape(srv), "mailappliance_up") == 1, what="a scrape again")

    hog = socket.create_connection(("127.0.0.1", port), timeout=30)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        before = rss(srv.proc.pid)
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        sent = flood(hog, request, 4 * 1024 * 1024)
        growth = rss(srv.proc.pid) - before
        print(f"metrics hog: sent {sent} bytes, server RSS +{growth}")
    finally:
        hog.close()
    assert sent < 4 * 1024 * 1024, "the server read every request: no flow control"
    assert growth < RSS_GROWTH_BOUND, growth
