"""delivery/remote.py (qmail-remote): MX choice, routes, loops, connections, timeouts, with
FakeResolver, MemoryReactor and StringTransport."""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailappliance.config import Route
from mailappliance.delivery import remote as rm
from mailappliance.envelope import DEFERRAL, FAILURE, SUCCESS
from mailappliance.queue.store import QueueStore
from mailappliance.testing import FakeResolver
from mailappliance.testing.threads import ImmediateThreadPool, ThreadlessReactor

ZONES = {
    "example.org": {"@": [["MX", "10 mx1"], ["MX", "20 mx2"]],
                    "mx1": [["A", "192.0.2.1"]], "mx2": [["A", "192.0.2.2"]]},
    "nomx.example": {"@": [["A", "192.0.2.9"]]},
    "nomail.example": {"@": [["MX", "0 ."]]},
    "loop.example": {"@": [["MX", "10 us"]], "us": [["A", "198.51.100.7"]]},
    "backup.example": {"@": [["MX", "10 primary"], ["MX", "20 us"]],
                       "primary": [["A", "192.0.2.30"]], "us": [["A", "198.51.100.7"]]},
    "broken.example": {"@": [["MX", "10 mx"]], "mx": [["A", "192.0.2.40"]]},
}
ME = {"198.51.100.7"}


class World:
    def __init__(self, tmp_path, routes=None, body=b"Subject: x\n\nhello\n.dot line\n",
                 rcpts=("a@example.org", "b@example.org"), sender="s@test.com"):
        self.reactor = ThreadlessReactor()
        self.pool = ImmediateThreadPool()
        self.queue = QueueStore(tmp_path / "q")
        qid = self.queue.inject(body, sender, list(rcpts), trigger=False)
        self.env = self.queue.read_envelope(qid)
        self.resolver = FakeResolver(ZONES)
        self.resolver.fail("broken.example", "servfail")
        table = {r.domain: r for r in (routes or [])}
        self.rd = rm.RemoteDeliverer(self.reactor, self.resolver, self.pool,
                                     hostname="mail.test.com",
                                     route_for=lambda d: table.get(d) or table.get(""),
                                     connect_timeout=60, reply_timeout=1200,
                                     is_me=lambda ip: ip in ME)
        self.out = []

    def deliver(self, indices=None):
        indices = list(range(len(self.env.recipients))) if indices is None else indices
        self.rd.deliver(self.env, indices, self.queue).addBoth(self.out.append)

    def connection(self, n=-1):
        host, port, factory, timeout, _bind = self.reactor.tcpClients[n]
        proto = factory.buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        return (host, port, timeout), factory, proto, tr

    def result(self):
        assert self.out, "deliver() has not finished"
        return self.out[0]


def converse(proto, tr, replies):
    """Feed each reply, collect what the client wrote in between."""
    sent = []
    for r in replies:
        proto.dataReceived(r)
        sent.append(tr.value())
        tr.clear()
    return sent


def finish(proto, tr):
    if tr.disconnecting:
        proto.connectionLost(Failure(error.ConnectionDone()))


def test_delivers_to_best_mx_with_pipelining_and_dot_stuffing(tmp_path):
    w = World(tmp_path)
    w.deliver()
    (host, port, timeout), _f, proto, tr = w.connection()
    assert (host, port, timeout) == ("192.0.2.1", 25, 60)
    sent = converse(proto, tr, [
        b"220 mx1 ESMTP\r\n",
        b"250-mx1\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
        b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n",
        b"250 ok queued as 123\r\n",
        b"221 bye\r\n"])
    assert sent[0] == b"EHLO mail.test.com\r\n"
    assert sent[1] == (b"MAIL FROM:<s@test.com> BODY=8BITMIME\r\nRCPT TO:<a@example.org>\r\n"
                       b"RCPT TO:<b@example.org>\r\nDATA\r\n")
    assert sent[2] == b"Subject: x\r\n\r\nhello\r\n..dot line\r\n.\r\n"
    assert sent[3] == b"QUIT\r\n"
    finish(proto, tr)
    results = w.result()
    assert [r.status for r in results] == [SUCCESS, SUCCESS]
    assert results[0].text == "192.0.2.1 accepted message.\nRemote host said: 250 ok queued as 123"


def test_next_mx_when_the_first_refuses_connections(tmp_path):
    w = World(tmp_path)
    w.deliver()
    _, f, _p, _t = w.connection(0)
    f.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    (host, port, _), _f, proto, tr = w.connection(1)
    assert host == "192.0.2.2"
    converse(proto, tr, [b"220 mx2\r\n", b"250 mx2\r\n", b"250 ok\r\n", b"250 ok\r\n",
                         b"250 ok\r\n", b"354 go\r\n", b"250 ok\r\n", b"221 bye\r\n"])
    finish(proto, tr)
    assert [r.status for r in w.result()] == [SUCCESS, SUCCESS]


def test_no_host_reachable_is_a_deferral(tmp_path):
    w = World(tmp_path)
    w.deliver()
    for n in range(2):
        _, f, _p, _t = w.connection(n)
        f.clientConnectionFailed(None, Failure(
            error.TimeoutError() if n == 0 else error.ConnectionRefusedError(111, "refused")))
    assert [r.status for r in w.result()] == [DEFERRAL, DEFERRAL]
    # qmail's text, then each address tried and what its connect said (host and errno).
    assert w.result()[0].text == (rm.T_NO_CONNECTION + "\n192.0.2.1:25: no answer within 60 s; "
                                  "192.0.2.2:25: Connection refused (errno 111)")


def test_greeting_421_tries_the_next_mx(tmp_path):
    w = World(tmp_path)
    w.deliver()
    _, _f, proto, tr = w.connection(0)
    assert converse(proto, tr, [b"421 busy\r\n"]) == [b"QUIT\r\n"]
    proto.connectionLost(Failure(error.ConnectionDone()))     # 421: the server hangs up
    assert len(w.reactor.tcpClients) == 2


def test_per_recipient_results_over_the_wire(tmp_path):
    w = World(tmp_path)
    w.deliver()
    _, _f, proto, tr = w.connection()
    converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250 PIPELINING\r\n",
                         b"250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n",
                         b"250 ok\r\n", b"221 bye\r\n"])
    finish(proto, tr)
    a, b = w.result()
    assert (a.status, b.status) == (FAILURE, SUCCESS)
    assert a.text == "192.0.2.1 does not like recipient.\nRemote host said: 550 5.1.1 unknown"


def test_implicit_mx_uses_the_domain_address(tmp_path):
    w = World(tmp_path, rcpts=("x@nomx.example",))
    w.deliver()
    (host, port, _), *_ = w.connection()
    assert (host, port) == ("192.0.2.9", 25)


def test_null_mx_and_nxdomain_are_permanent(tmp_path):
    for rcpt in ("x@nomail.example", "x@nonexistent.example.org"):
        w = World(tmp_path / rcpt, rcpts=(rcpt,))
        w.deliver()
        [r] = w.result()
        assert r.status == FAILURE and "(#5.1.2)" in r.text
        assert w.reactor.tcpClients == []


def test_servfail_is_temporary(tmp_path):
    w = World(tmp_path, rcpts=("x@broken.example",))
    w.deliver()
    [r] = w.result()
    assert r.status == DEFERRAL and "(#4.1.2)" in r.text


def test_mx_pointing_to_us_is_a_loop(tmp_path):
    w = World(tmp_path, rcpts=("x@loop.example",))
    w.deliver()
    [r] = w.result()
    assert (r.status, r.text) == (FAILURE, rm.T_LOOP)
    assert w.reactor.tcpClients == []


def test_we_as_backup_mx_only_try_the_better_ones(tmp_path):
    w = World(tmp_path, rcpts=("x@backup.example",))
    w.deliver()
    (host, _p, _t), _f, _proto, _tr = w.connection()
    assert host == "192.0.2.30"
    _f.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    assert len(w.reactor.tcpClients) == 1      # never to ourselves
    assert w.result()[0].status == DEFERRAL


def test_route_overrides_mx_with_host_and_port(tmp_path):
    w = World(tmp_path, routes=[Route("example.org", "127.0.0.1", 2526)])
    w.deliver()
    (host, port, _), *_ = w.connection()
    assert (host, port) == ("127.0.0.1", 2526)    # loopback: no loop check for a route


def test_default_route(tmp_path):
    w = World(tmp_path, routes=[Route("", "192.0.2.77", 587)])
    w.deliver()
    (host, port, _), *_ = w.connection()
    assert (host, port) == ("192.0.2.77", 587)


def test_reply_timeout_defers(tmp_path):
    w = World(tmp_path)
    w.deliver()
    _, _f, proto, tr = w.connection()
    proto.dataReceived(b"220 mx\r\n")
    w.reactor.advance(1199)
    assert not tr.disconnecting
    w.reactor.advance(1)
    assert tr.disconnecting
    proto.connectionLost(Failure(error.ConnectionAborted()))
    # the timeout happened before a transaction: the next MX gets its chance
    assert len(w.reactor.tcpClients) == 2


def test_timeout_after_data_is_a_deferral_with_a_timeout_text(tmp_path):
    w = World(tmp_path, rcpts=("a@example.org",))
    w.deliver()
    _, _f, proto, tr = w.connection()
    converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250 PIPELINING\r\n",
                         b"250 ok\r\n250 ok\r\n354 go\r\n"])
    w.reactor.advance(1200)
    proto.connectionLost(Failure(error.ConnectionAborted()))
    [r] = w.result()
    assert r.status == DEFERRAL
    assert r.text == "Connected to 192.0.2.1 but the connection timed out. (#4.4.2)"
    assert len(w.reactor.tcpClients) == 1


def test_large_message_is_streamed_with_flow_control(tmp_path):
    body = (b"x" * 99 + b"\n") * 5000 + b".\n"          # 500 KB > PRELOAD_MAX
    w = World(tmp_path, rcpts=("a@example.org",), body=body)
    w.deliver()
    _, _f, proto, tr = w.connection()
    converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250 PIPELINING\r\n"])
    tr.clear()
    proto.pauseProducing()
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert tr.value() == b""                  # paused: nothing written yet
    proto.resumeProducing()
    wire = tr.value()
    assert wire.endswith(b"\r\n..\r\n.\r\n")
    assert len(wire) == len(body) + body.count(b"\n") + 1 + 3
    tr.clear()
    proto.dataReceived(b"250 ok\r\n")
    assert tr.value() == b"QUIT\r\n"


def test_local_addresses_include_loopback():
    is_me = rm.make_is_me()
    assert is_me("127.0.0.1") and is_me("::1") and is_me("0.0.0.0")
    assert not is_me("192.0.2.1") and not is_me("not an ip")
