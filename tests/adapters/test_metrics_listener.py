"""The metrics listener's bounds on a test clock (metrics.py): at most METRICS_MAX_CONNECTIONS
at once, the next one answered 503; an idle connection closed after METRICS_IDLE_TIMEOUT, and
an unread one aborted after twisted.web's abort timeout, both without a log line."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mailappliance import metrics
from mailappliance.descriptors import METRICS_MAX_CONNECTIONS
from mailappliance.testing.app import build_test_app

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


class Transport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def connect(site):
    proto = site.buildProtocol(PEER)
    tr = Transport(peerAddress=PEER)
    proto.makeConnection(tr)
    return proto, tr


def test_connection_limit_then_503(tmp_path):
    app = build_test_app(tmp_path)
    site = metrics.build_factory(app, "metrics")
    held = [connect(site) for _ in range(METRICS_MAX_CONNECTIONS)]
    assert app.stats["connections.metrics.now"] == METRICS_MAX_CONNECTIONS
    _, tr = connect(site)
    assert tr.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert tr.disconnecting
    assert app.stats["connections.metrics.now"] == METRICS_MAX_CONNECTIONS
    proto, _ = held[0]
    proto.connectionLost(None)
    _, tr = connect(site)
    assert tr.value() == b"" and not tr.disconnecting            # a slot again


def test_idle_connection_closed_quietly_and_an_unread_one_aborted(tmp_path):
    app = build_test_app(tmp_path)
    site = metrics.build_factory(app, "metrics")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto, tr = connect(site)
        app.reactor.advance(metrics.METRICS_IDLE_TIMEOUT - 1)
        assert not tr.disconnecting
        app.reactor.advance(1)
        assert tr.disconnecting                          # loseConnection at the idle timeout
        assert not tr.aborted
        app.reactor.advance(proto.abortTimeout)         # the client never let it close
        assert tr.aborted
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "out client" in str(e.get("log_format"))], events
