"""ClamdScanner and RspamdScorer (mailappliance/scan/client.py) with Twisted's doubles:
MemoryReactorClock records the connection, StringTransport plays the socket, the Clock runs
the deadline. The real daemons are in test_scan_daemons.py."""

from __future__ import annotations

import struct

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailappliance.scan import client as client_mod
from mailappliance.scan.client import ClamdScanner, RspamdScorer
from mailappliance.scan.endpoints import check_endpoint, endpoint_description, split_scorer
from mailappliance.scan.clamd import END_OF_STREAM, IDSESSION, INSTREAM
from mailappliance.scan.interfaces import (
    ISpamScorer, IVirusScanner, ScanEnvelope, ScanFailure, SpamReport, VirusReport)

import pytest


def connect(reactor, index=-1):
    """Complete the recorded connection attempt with a StringTransport."""
    _, factory, _, _ = reactor.unixClients[index]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def pump(transport, limit=10_000):
    """Play the consumer: ask the pull producer for data until it unregisters."""
    turns = 0
    while transport.producer is not None and turns < limit:
        transport.producer.resumeProducing()
        turns += 1
    return turns


def test_clients_provide_their_interfaces():
    reactor = MemoryReactorClock()
    assert verifyObject(IVirusScanner, ClamdScanner("unix:/x", reactor))
    assert verifyObject(ISpamScorer, RspamdScorer("unix:/x", reactor))


def test_endpoint_texts():
    assert endpoint_description("/run/clamav/clamd.ctl") == "unix:/run/clamav/clamd.ctl"
    assert endpoint_description("/odd:path") == "unix:/odd\\:path"
    assert endpoint_description("tcp:127.0.0.1:3310") == "tcp:127.0.0.1:3310"
    assert split_scorer("unix:/run/rspamd/normal.sock") == \
        ("rspamd", "unix:/run/rspamd/normal.sock")
    assert split_scorer("rspamd:tcp:127.0.0.1:11333") == ("rspamd", "tcp:127.0.0.1:11333")
    with pytest.raises(ValueError, match="not implemented"):
        split_scorer("spamd:unix:/run/spamd.sock")
    with pytest.raises(ValueError):
        ClamdScanner("unix:/x", MemoryReactorClock(), timeout=0)
    assert check_endpoint("/run/clamav/clamd.ctl") is None
    assert check_endpoint("tcp:127.0.0.1:3310") is None
    assert "unknown endpoint type" in check_endpoint("ssl:127.0.0.1:3310")
    assert "unknown endpoint type" in check_endpoint("clamd.ctl")
    assert check_endpoint("tcp:127.0.0.1") is not None          # no port


def request(msg: bytes) -> bytes:
    return INSTREAM + struct.pack(">I", len(msg)) + msg + END_OF_STREAM


def test_instream_conversation_in_a_session_kept_for_the_next_scan():
    reactor = MemoryReactorClock()
    scanner = ClamdScanner("unix:/run/clamd.ctl", reactor, timeout=30)
    d = scanner.scan([b"Subject: x\n\n", b"body\n"])
    assert reactor.unixClients[0][0] == "/run/clamd.ctl"
    proto, transport = connect(reactor)
    pump(transport)
    msg = b"Subject: x\n\nbody\n"
    assert transport.value() == IDSESSION + request(msg)
    assert not d.called
    proto.dataReceived(b"1: stream: Eicar-Signature FO")
    assert not d.called
    proto.dataReceived(b"UND\0")
    assert d.result == VirusReport("Eicar-Signature")
    assert not transport.disconnecting                 # kept for the next scan
    # The next scan goes over the same connection: no new connect, command number 2.
    transport.clear()
    d = scanner.scan(b"clean\n")
    assert len(reactor.unixClients) == 1
    pump(transport)
    assert transport.value() == request(b"clean\n")
    proto.dataReceived(b"2: stream: OK\0")
    assert d.result == VirusReport(None)
    # Idle for SESSION_IDLE_SECONDS: closed; the only timer left was the one doing that.
    reactor.advance(client_mod.SESSION_IDLE_SECONDS)
    assert transport.disconnecting and not reactor.getDelayedCalls()


def test_a_connection_that_gave_a_wrong_or_extra_answer_is_not_kept():
    reactor = MemoryReactorClock()
    scanner = ClamdScanner("unix:/c", reactor)
    d = scanner.scan(b"x")
    proto, transport = connect(reactor)
    pump(transport)
    proto.dataReceived(b"7: stream: OK\0")           # not the number of our command
    assert isinstance(d.result, ScanFailure) and d.result.outage
    assert transport.disconnecting
    d = scanner.scan(b"x")
    proto, transport = connect(reactor)                 # a new connection
    proto.dataReceived(b"1: stream: OK\0junk")
    assert d.result == VirusReport(None)                # the answer counts; the rest does not
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    d = scanner.scan(b"x")
    proto, transport = connect(reactor)
    pump(transport)
    proto.dataReceived(b"1: stream: OK\0")
    proto.dataReceived(b"2: PONG\0")                 # speaking unasked while idle
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    scanner.scan(b"x")
    assert len(reactor.unixClients) == 4                # nothing was reused


def test_a_kept_connection_closed_between_scans_is_retried_once_on_a_new_one():
    reactor = MemoryReactorClock()
    scanner = ClamdScanner("unix:/c", reactor)
    scanner.scan(b"x")
    proto, transport = connect(reactor)
    pump(transport)
    proto.dataReceived(b"1: stream: OK\0")
    d = scanner.scan(b"y")                             # on the kept connection...
    proto.connectionLost(Failure(ConnectionDone()))    # ...which clamd had just closed
    assert not d.called and len(reactor.unixClients) == 2
    proto2, transport2 = connect(reactor)
    pump(transport2)
    assert transport2.value() == IDSESSION + request(b"y")
    proto2.connectionLost(Failure(ConnectionDone()))  # a new connection fails: that is final
    assert d.result == ScanFailure("clamd closed the connection without an answer")
    assert len(reactor.unixClients) == 2


def test_a_kept_connection_that_began_answering_is_not_retried():
    reactor = MemoryReactorClock()
    scanner = ClamdScanner("unix:/c", reactor)
    scanner.scan(b"x")
    proto, transport = connect(reactor)
    pump(transport)
    proto.dataReceived(b"1: stream: OK\0")
    d = scanner.scan(b"y")
    pump(transport)
    proto.dataReceived(b"2: stream: OK")              # no NUL: cut off
    proto.connectionLost(Failure(ConnectionDone()))
    assert isinstance(d.result, ScanFailure) and "mid-reply" in d.result.detail
    assert len(reactor.unixClients) == 1


def test_a_stale_idle_connection_is_not_used():
    reactor = MemoryReactorClock()
    scanner = ClamdScanner("unix:/c", reactor)
    scanner.scan(b"x")
    proto, transport = connect(reactor)
    pump(transport)
    proto.dataReceived(b"1: stream: OK\0")
    reactor.advance(client_mod.SESSION_IDLE_SECONDS - 0.5)
    scanner.scan(b"y")
    assert len(reactor.unixClients) == 1                # still fresh: reused
    pump(transport)
    proto.dataReceived(b"2: stream: OK\0")
    reactor.advance(client_mod.SESSION_IDLE_SECONDS - 0.5)
    assert not transport.disconnecting                  # its idle time began at scan 2
    reactor.advance(0.5)
    assert transport.disconnecting


def test_at_most_max_idle_sessions_are_kept_and_close_closes_them():
    reactor = MemoryReactorClock()
    scanner = ClamdScanner("unix:/c", reactor)
    n = client_mod.MAX_IDLE_SESSIONS + 3
    ds = [scanner.scan(b"x") for _ in range(n)]
    conns = [connect(reactor, i) for i in range(n)]
    for _, t in conns:
        pump(t)
    for proto, _ in conns:
        proto.dataReceived(b"1: stream: OK\0")
    assert all(d.result == VirusReport(None) for d in ds)
    assert sum(t.disconnecting for _, t in conns) == 3
    closed = scanner.close()
    assert all(t.disconnecting for _, t in conns)
    assert not closed.called and not reactor.getDelayedCalls()
    for proto, _ in conns:
        proto.connectionLost(Failure(ConnectionDone()))
    assert closed.called
    d = scanner.scan(b"x")                              # still scans, keeps nothing
    proto, transport = connect(reactor)
    pump(transport)
    proto.dataReceived(b"1: stream: OK\0")
    assert d.result == VirusReport(None) and transport.disconnecting


class _Socket:
    """The socket under a _PlainTransport: takes `room` bytes, then would block."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.calls: list[list] = []
        self.data = b""

    def sendmsg(self, buffers):
        self.calls.append(list(buffers))
        if self.room <= 0:
            raise BlockingIOError()
        data = b"".join(bytes(b) for b in buffers)[:self.room]
        self.room -= len(data)
        self.data += data
        return len(data)


class _PlainTransport(StringTransport):
    """A StringTransport with the attributes of Twisted's plain socket transports, so the
    client writes to its `socket` directly as it does to a real unix or TCP client."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.socket = _Socket(room)
        self.connected = True
        self._writeDisconnected = False
        self._tempDataBuffer: list = []
        self.dataBuffer = b""
        self.offset = 0


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.setattr(client_mod, "_PLAIN_CLIENTS", (_PlainTransport,))

    def make(reactor, room):
        _, factory, _, _ = reactor.unixClients[-1]
        proto = factory.buildProtocol(None)
        transport = _PlainTransport(room)
        proto.makeConnection(transport)
        return proto, transport
    return make


def test_a_request_that_fits_the_socket_is_one_sendmsg_of_the_message_itself(plain):
    reactor = MemoryReactorClock()
    msg = b"x" * (100 * 1024)
    ClamdScanner("unix:/c", reactor).scan(msg)
    _, transport = plain(reactor, room=1 << 20)
    assert transport.producer is None                  # nothing left to pull
    assert transport.value() == b""                    # nothing went through Twisted's buffer
    sock = transport.socket
    # Two sendmsg calls (one per WRITE_BYTES piece), the message's bytes as slices of it.
    assert len(sock.calls) == 2
    assert all(b is msg or (isinstance(b, memoryview) and b.obj is msg)
               for call in sock.calls for b in call if len(b) > 100)
    frame = client_mod.clamd.FRAME_BYTES
    assert sock.data == (IDSESSION + INSTREAM + struct.pack(">I", frame) + msg[:frame]
                         + struct.pack(">I", len(msg) - frame) + msg[frame:] + END_OF_STREAM)


def test_what_the_socket_does_not_take_goes_through_twisted_piece_by_piece(plain):
    reactor = MemoryReactorClock()
    msg = b"y" * 300_000
    ClamdScanner("unix:/c", reactor).scan(msg)
    proto, transport = plain(reactor, room=100_000)
    assert len(transport.socket.data) == 100_000
    assert 0 < len(transport.value()) <= client_mod.WRITE_BYTES + 100
    assert transport.producer is not None
    sizes = []
    while transport.producer is not None:
        before = len(transport.value())
        transport.producer.resumeProducing()
        sizes.append(len(transport.value()) - before)
    assert max(sizes) <= client_mod.WRITE_BYTES + 100
    wire = transport.socket.data + transport.value()
    assert wire == IDSESSION + b"".join(bytes(b) for b in client_mod.clamd.instream_request([msg]))


def test_a_big_message_is_pulled_piece_by_piece():
    reactor = MemoryReactorClock()
    big = [b"a" * 1000] * 1000                         # 1 MB in 1000 chunks
    ClamdScanner("unix:/c", reactor).scan(big)
    _, transport = connect(reactor)
    sizes = []
    while transport.producer is not None:
        before = len(transport.value())
        transport.producer.resumeProducing()
        sizes.append(len(transport.value()) - before)
    # Each turn writes about one 64 KiB chunk, never the whole message.
    assert len(sizes) >= 1_000_000 // client_mod.WRITE_BYTES - 1
    assert max(sizes) <= client_mod.WRITE_BYTES + 1000 + 20


def test_timeout_while_waiting_for_the_answer():
    reactor = MemoryReactorClock()
    d = ClamdScanner("unix:/c", reactor, timeout=30).scan(b"x")
    proto, transport = connect(reactor)
    pump(transport)
    reactor.advance(29.9)
    assert not d.called
    reactor.advance(0.1)
    assert d.result == ScanFailure("no answer within 30 s")
    assert transport.disconnected
    proto.connectionLost(Failure(ConnectionDone()))    # the abort's aftermath changes nothing
    assert d.result == ScanFailure("no answer within 30 s")


def test_timeout_while_connecting_stops_the_attempt():
    reactor = MemoryReactorClock()
    d = ClamdScanner("unix:/c", reactor, timeout=5).scan(b"x")
    reactor.advance(5)
    assert d.result == ScanFailure("no answer within 5 s")
    assert reactor.connectors[0].stoppedConnecting


def test_refused_connection_is_a_failure_at_once():
    reactor = MemoryReactorClock()
    d = ClamdScanner("unix:/c", reactor).scan(b"x")
    _, factory, _, _ = reactor.unixClients[0]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert isinstance(d.result, ScanFailure) and "cannot connect to clamd" in d.result.detail
    assert not reactor.getDelayedCalls()


def test_close_without_answer_and_garbage():
    reactor = MemoryReactorClock()
    scanner = ClamdScanner("unix:/c", reactor)
    d = scanner.scan(b"x")
    proto, transport = connect(reactor)
    pump(transport)
    proto.connectionLost(Failure(ConnectionDone()))
    assert d.result == ScanFailure("clamd closed the connection without an answer")
    d = scanner.scan(b"x")
    proto, transport = connect(reactor)
    proto.dataReceived(b"x" * 5000)                    # no NUL in sight: not clamd
    assert isinstance(d.result, ScanFailure) and d.result.outage


def test_size_limit_answer_while_still_sending():
    reactor = MemoryReactorClock()
    d = ClamdScanner("unix:/c", reactor).scan([b"a" * 100_000])
    proto, transport = connect(reactor)
    transport.producer.resumeProducing()               # part of the message is out
    proto.dataReceived(b"1: INSTREAM size limit exceeded. ERROR\0")
    assert isinstance(d.result, ScanFailure) and not d.result.outage
    assert transport.disconnected


def test_cancel_aborts_the_connection():
    reactor = MemoryReactorClock()
    d = ClamdScanner("unix:/c", reactor).scan(b"x")
    proto, transport = connect(reactor)
    d.cancel()
    assert d.result.check(CancelledError)
    d.addErrback(lambda f: None)
    assert transport.disconnected and not reactor.getDelayedCalls()
    proto.dataReceived(b"stream: OK\0")               # late bytes are ignored


def test_ping():
    reactor = MemoryReactorClock()
    d = ClamdScanner("unix:/c", reactor).ping()
    proto, transport = connect(reactor)
    pump(transport)
    assert transport.value() == b"zPING\0"
    proto.dataReceived(b"PONG\0")
    assert d.called and d.result is None


def test_rspamd_request_and_reply():
    reactor = MemoryReactorClock()
    scorer = RspamdScorer("unix:/run/rspamd.sock", reactor)
    env = ScanEnvelope("192.0.2.1", "helo.example", "a@b.example", ("c@test.com",))
    d = scorer.score([b"Subject: x\n\n", b"hi\n"], env)
    proto, transport = connect(reactor)
    pump(transport)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"POST /checkv2 HTTP/1.1\r\n")
    assert b"Content-Length: 15\r\n" in head + b"\r\n" and b"\r\nRcpt: <c@test.com>" in head
    assert body == b"Subject: x\n\nhi\n"
    reply = b'{"score": 7.5, "action": "add header", "symbols": {"B": {}, "A": {}}}'
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(reply))
    assert not d.called
    proto.dataReceived(reply)
    assert d.result == SpamReport(7.5, ("A", "B"), "add header")
    assert transport.disconnected


def test_rspamd_reply_ending_at_close_and_ping():
    reactor = MemoryReactorClock()
    scorer = RspamdScorer("unix:/r", reactor)
    d = scorer.ping()
    proto, transport = connect(reactor)
    pump(transport)
    assert transport.value().startswith(b"GET /ping HTTP/1.1\r\n")
    proto.dataReceived(b"HTTP/1.0 200 OK\r\n\r\npong\r\n")
    assert not d.called
    proto.connectionLost(Failure(ConnectionDone()))
    assert d.called and d.result is None
    d = scorer.score(b"x", ScanEnvelope())
    proto, transport = connect(reactor)
    proto.dataReceived(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom")
    assert isinstance(d.result, ScanFailure) and "HTTP 500" in d.result.detail


def test_tcp_endpoints_connect_over_tcp():
    reactor = MemoryReactorClock()
    ClamdScanner("tcp:127.0.0.1:3310", reactor).scan(b"x")
    RspamdScorer("tcp:127.0.0.1:11333", reactor).ping()
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 3310), ("127.0.0.1", 11333)]


def test_a_scan_logs_nothing_of_its_own():
    """Twisted's factories log "Starting factory" per connection unless told not to: that
    would be two lines per scanned message in the mail log."""
    from twisted.logger import capturedLogs
    reactor = MemoryReactorClock()
    with capturedLogs() as events:
        d = ClamdScanner("unix:/c", reactor).scan(b"x")
        _, factory, _, _ = reactor.unixClients[0]
        factory.doStart()                  # what a real connector does around a connection
        proto, transport = connect(reactor)
        pump(transport)
        proto.dataReceived(b"1: stream: OK\0")
        proto.connectionLost(Failure(ConnectionDone()))
        factory.doStop()
    assert d.result == VirusReport(None)
    assert events == []
