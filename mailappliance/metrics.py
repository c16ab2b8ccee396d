"""Prometheus metrics at ``/metrics`` on the ``[listen] metrics`` endpoints (off by default).

The same facts as ``mailappliance stat``, as the maintained client library's text format
(prometheus_client's generate_latest), served by twisted.web on the reactor. Every name and
what it counts is in docs/MONITORING.md:

    mailappliance_up                                    1 while serving
    mailappliance_start_time_seconds                    when the server started
    mailappliance_connections_total{kind}               accepted since start, per listener kind
    mailappliance_connections_open{kind}                open now
    mailappliance_messages_committed_total              messages the queue committed (250 ok)
    mailappliance_queue_write_errors_total              commits that failed (451 qq write error)
    mailappliance_deliveries_total{result}              success | deferral | failure
    mailappliance_bounces_total{kind}                   bounce | double | triple (discarded)
    mailappliance_queue_messages                        messages in the queue directory
    mailappliance_queue_oldest_message_age_seconds      age of the oldest message being handled
    mailappliance_deliveries_in_progress{channel}       local | remote, with their limits in
    mailappliance_delivery_slots{channel}
    mailappliance_dns_lookups_total, ..._dns_cache_hits_total, ..._dns_timeouts_total,
    mailappliance_dns_failures_total
    mailappliance_dnsbl_checks_total, ..._dnsbl_refusals_total, ..._dnsbl_timeouts_total
                                                        clients looked up, refused, and list
                                                        lookups cut at dnsbl_timeout
    mailappliance_failed_logins_total{protocol}         smtp (AUTH) | pop3: the fail2ban lines
    mailappliance_tls_handshakes_total                  server handshakes completed

Counting costs nothing new on the hot paths: the collector reads the counters `stat` reads,
when scraped. Failed logins are counted by stats.FailedLogins, a log observer of the one line
per failure that fail2ban reads; the queue is counted in the thread pool, as `stat` does.

Never on a public address by default: config.py refuses a non-loopback TCP endpoint unless
``[metrics] allow_public = true``. At most METRICS_MAX_CONNECTIONS connections at once (one
more gets a 503), counted in the descriptor reserve, each closed after METRICS_IDLE_TIMEOUT
of silence. A scrape is a plain GET of /metrics; anything else is 404,
and requests are not logged (a scrape every 15 s would fill the mail log).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.internet import protocol
from twisted.web import http, resource, server

from mailappliance import stats as stats_mod
from mailappliance.descriptors import METRICS_MAX_CONNECTIONS

if TYPE_CHECKING:
    from mailappliance.app import App

PREFIX = "mailappliance"
# Seconds a scrape connection may stay silent before it is closed (twisted.web's idle timeout;
# its default is 12 hours). Prometheus' default scrape_timeout is 10 s and a scrape is answered
# in well under a second, so 60 s only ends connections nobody uses; with at most
# METRICS_MAX_CONNECTIONS of them (descriptors.py), a client that holds them open can delay
# scrapes by this long, never take descriptors from anything else.
METRICS_IDLE_TIMEOUT = 60


class AppCollector:
    """A prometheus_client collector over the App's counters (the ones `stat` reads);
    `queue_messages` is set by the resource (counted in a thread) just before each
    generate_latest."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.queue_messages: int | None = None

    def collect(self):
        app = self.app
        now = app.reactor.seconds()
        up = GaugeMetricFamily(f"{PREFIX}_up", "1 while the server serves")
        up.add_metric([], 1)
        yield up
        start = GaugeMetricFamily(f"{PREFIX}_start_time_seconds",
                                  "UNIX time the server started")
        start.add_metric([], app.started)
        yield start

        total = CounterMetricFamily(f"{PREFIX}_connections", "connections accepted since start",
                                    labels=["kind"])
        open_ = GaugeMetricFamily(f"{PREFIX}_connections_open", "connections open now",
                                  labels=["kind"])
        kinds = list(dict.fromkeys(l.kind for l in app.listeners))
        for kind in kinds:
            n_now, n_total = stats_mod.connections(app.stats, kind)
            total.add_metric([kind], n_total or 0)
            open_.add_metric([kind], n_now or 0)
        yield total
        yield open_

        inj = dict(app.injector.stats) if app.injector is not None else {}
        c = CounterMetricFamily(f"{PREFIX}_messages_committed",
                                "messages committed to the queue (each got its 250 ok)")
        c.add_metric([], inj.get("commits", 0))
        yield c
        c = CounterMetricFamily(f"{PREFIX}_queue_write_errors",
                                "queue commits that failed (451 qq write error)")
        c.add_metric([], inj.get("write_errors", 0))
        yield c

        manager = app.queue_manager
        ms = dict(manager.stats) if manager is not None else {}
        c = CounterMetricFamily(f"{PREFIX}_deliveries", "delivery attempts by result",
                                labels=["result"])
        for result in ("success", "deferral", "failure"):
            c.add_metric([result], ms.get(result, 0))
        yield c
        c = CounterMetricFamily(f"{PREFIX}_bounces", "bounces injected (triple: discarded)",
                                labels=["kind"])
        for kind, key in (("bounce", "bounces"), ("double", "double_bounces"),
                          ("triple", "triple_bounces")):
            c.add_metric([kind], ms.get(key, 0))
        yield c

        g = GaugeMetricFamily(f"{PREFIX}_queue_messages", "messages in the queue directory")
        if self.queue_messages is not None:
            g.add_metric([], self.queue_messages)
        yield g
        g = GaugeMetricFamily(f"{PREFIX}_queue_oldest_message_age_seconds",
                              "age of the oldest message the queue manager holds (0: none)")
        oldest = manager.oldest_birth() if manager is not None else None
        g.add_metric([], stats_mod.oldest_age(now, oldest))
        yield g
        if manager is not None:
            status = manager.status()
            busy = GaugeMetricFamily(f"{PREFIX}_deliveries_in_progress",
                                     "deliveries running now", labels=["channel"])
            slots = GaugeMetricFamily(f"{PREFIX}_delivery_slots",
                                      "concurrency_local / concurrency_remote",
                                      labels=["channel"])
            for channel in ("local", "remote"):
                busy.add_metric([channel], status.get(f"{channel}_busy", 0))
                slots.add_metric([channel], status.get(f"{channel}_max", 0))
            yield busy
            yield slots
            for name, key, text in (
                    ("queue_in_memory", "active",
                     "messages the queue manager holds in memory (its active window)"),
                    ("queue_backlog", "backlog",
                     "messages known as 24-byte backlog entries, outside the window"),
                    ("dead_destinations", "dead",
                     "remote destinations dead now (their messages wait without trying)")):
                g = GaugeMetricFamily(f"{PREFIX}_{name}", text)
                v = status.get(key, 0)
                g.add_metric([], len(v) if isinstance(v, (list, tuple)) else v)
                yield g

        rs = dict(app.resolver.stats) if app.resolver is not None else {}
        for name, key, text in (("dns_lookups", "queries", "DNS lookups"),
                                ("dns_cache_hits", "cache_hits", "DNS lookups from the cache"),
                                ("dns_timeouts", "timeouts", "DNS lookups that timed out"),
                                ("dns_failures", "failures", "DNS lookups that failed")):
            c = CounterMetricFamily(f"{PREFIX}_{name}", text)
            c.add_metric([], rs.get(key, 0))
            yield c

        ds = dict(app.dnsbl.stats)
        for name, key, text in (("dnsbl_checks", "checks", "clients looked up in the DNSBLs"),
                                ("dnsbl_refusals", "refusals", "clients a DNSBL verdict refused"),
                                ("dnsbl_timeouts", "timeouts",
                                 "DNSBL lookups cut at dnsbl_timeout")):
            c = CounterMetricFamily(f"{PREFIX}_{name}", text)
            c.add_metric([], ds.get(key, 0))
            yield c

        c = CounterMetricFamily(f"{PREFIX}_failed_logins",
                                "failed SMTP AUTH and POP3 logins (the lines fail2ban reads)",
                                labels=["protocol"])
        for protocol, n in stats_mod.failed_logins(app.stats).items():
            c.add_metric([protocol], n)
        yield c
        c = CounterMetricFamily(f"{PREFIX}_tls_handshakes",
                                "server TLS handshakes completed (STARTTLS, STLS, implicit TLS)")
        c.add_metric([], getattr(app.tls, "handshakes", 0) if app.tls is not None else 0)
        yield c


class MetricsResource(resource.Resource):
    """GET /metrics: the queue counted in the pool, then the registry's text."""

    isLeaf = True
    log = Logger()

    def __init__(self, app: App, collector: AppCollector) -> None:
        super().__init__()
        self.app = app
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def render_GET(self, request):
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: metrics are at /metrics\n"
        d = deferToThreadPool(self.app.reactor, self.app.threadpool,
                              self.app.queue_store.count)

        def write(count):
            self.collector.queue_messages = count
            body = generate_latest(self.registry)
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            request.write(body)
            request.finish()

        def failed(f):
            self.log.failure("metrics: scrape failed", f)
            request.setResponseCode(500)
            request.finish()
        d.addCallback(write)
        d.addErrback(failed)
        return server.NOT_DONE_YET


class _CountedChannel(http.HTTPChannel):
    """Counts its connection in app.stats, as every listener does (`stat`, the metrics), and
    times out idle connections without twisted.web's "Timing out client" lines (a Prometheus
    whose scrape interval passes METRICS_IDLE_TIMEOUT would put one in the mail log per
    scrape)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        stats_mod.connection_opened(self.site.app.stats, "metrics")

    def timeoutConnection(self) -> None:
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def forceAbortClient(self) -> None:
        self._abortingCall = None
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        stats_mod.connection_closed(self.site.app.stats, "metrics")


class _Busy(protocol.Protocol):
    """A connection past METRICS_MAX_CONNECTIONS: a plain 503, then the close."""

    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 40\r\nConnection: close\r\n\r\n"
                             b"too many metrics connections; try again\n")
        self.transport.loseConnection()


class _QuietSite(server.Site):
    noisy = False
    protocol = _CountedChannel

    def buildProtocol(self, addr):
        now, _ = stats_mod.connections(self.app.stats, "metrics")
        if (now or 0) >= METRICS_MAX_CONNECTIONS:
            return _Busy()
        return super().buildProtocol(addr)

    def log(self, request) -> None:
        """No access log: scrapes every few seconds would fill the mail log."""


def build_factory(app: App, kind: str) -> server.Site:
    """The metrics listeners' factory (service.LISTENER_KINDS; one shared by all of them)."""
    site = _QuietSite(MetricsResource(app, AppCollector(app)), timeout=METRICS_IDLE_TIMEOUT,
                      reactor=app.reactor)
    site.app = app
    site.displayTracebacks = False
    return site
