"""delivery/remote.py (qmail-remote): MX choice, routes, loops, connections, timeouts, with
FakeResolver, MemoryReactor and StringTransport."""

from __future__ import annotations

import re

from twisted.internet import error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailappliance.config import Route
from mailappliance.delivery import remote as rm
from mailappliance.envelope import DEFERRAL, FAILURE, SUCCESS
from mailappliance.queue.store import QueueStore
from mailappliance.smtp import client as sc
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
                 rcpts=("a@example.org", "b@example.org"), sender="s@test.com",
                 reply_timeout=600, attempt_lifetime=rm.ATTEMPT_LIFETIME):
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
                                     connect_timeout=60, reply_timeout=reply_timeout,
                                     attempt_lifetime=attempt_lifetime,
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
    # ... and says so to the queue manager, which then treats the destination as dead.
    assert all(r.unreachable for r in w.result())


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
    assert r.status == DEFERRAL and "(#4.1.2)" in r.text and r.unreachable


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


def test_a_trickled_greeting_earns_no_time_and_the_next_mx_gets_its_turn(tmp_path):
    """Issue 18: one byte a second used to restart the timer; now the greeting must be complete
    within REPLY_DEADLINES["greeting"] of the connection, whatever arrives before."""
    w = World(tmp_path)
    w.deliver()
    _, _f, proto, tr = w.connection()
    greeting = b"220 mx1 ESMTP slow\r\n"
    for byte in greeting[:-1]:                 # 19 bytes, one a second, never the line end
        proto.dataReceived(bytes([byte]))
        w.reactor.advance(1)
    w.reactor.advance(sc.REPLY_DEADLINES["greeting"] - 1 - (len(greeting) - 1))   # 299 s
    assert tr.value() == b"" and not tr.disconnecting
    w.reactor.advance(1)                        # 300 s after connecting
    assert tr.disconnecting
    proto.connectionLost(Failure(error.ConnectionAborted()))
    # before a transaction: the next MX gets its chance
    assert len(w.reactor.tcpClients) == 2
    assert w.out == []


def test_each_reply_gets_its_own_stage_deadline(tmp_path):
    """A complete reply restarts the clock with the next reply's limit (RFC 5321 4.5.3.2):
    DATA's 354 gets 120 s, the reply after the message 600 s."""
    w = World(tmp_path, rcpts=("a@example.org",))
    w.deliver()
    _, _f, proto, tr = w.connection()
    converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250 PIPELINING\r\n"])
    w.reactor.advance(299)
    proto.dataReceived(b"250 ok\r\n")           # MAIL, just in time
    w.reactor.advance(299)
    proto.dataReceived(b"250 ok\r\n")           # RCPT, just in time
    w.reactor.advance(119)
    assert not tr.disconnecting
    w.reactor.advance(1)                        # DATA's 354: 120 s
    assert tr.disconnecting
    proto.connectionLost(Failure(error.ConnectionAborted()))
    [r] = w.result()
    assert r.status == DEFERRAL
    assert r.text == ("Connected to 192.0.2.1 but it sent its reply to DATA too slowly: "
                      "not complete within 120 s. (#4.4.2)")
    assert len(w.reactor.tcpClients) == 1       # a transaction had begun: no next MX


def test_slow_reply_after_the_message_is_a_deferral_naming_it(tmp_path):
    w = World(tmp_path, rcpts=("a@example.org",))
    w.deliver()
    _, _f, proto, tr = w.connection()
    converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250 PIPELINING\r\n",
                         b"250 ok\r\n250 ok\r\n354 go\r\n"])
    proto.dataReceived(b"25")
    w.reactor.advance(599)
    proto.dataReceived(b"0 o")                  # bytes, no line end: no more time
    assert not tr.disconnecting
    w.reactor.advance(1)
    assert tr.disconnecting
    proto.connectionLost(Failure(error.ConnectionAborted()))
    [r] = w.result()
    assert r.status == DEFERRAL
    assert r.text == ("Connected to 192.0.2.1 but it sent its reply to the message too "
                      "slowly: not complete within 600 s. (#4.4.2)")
    assert not r.unreachable                    # it answered: alive, if slow
    assert len(w.reactor.tcpClients) == 1


def test_reply_timeout_setting_caps_every_stage(tmp_path):
    w = World(tmp_path, reply_timeout=5)
    w.deliver()
    _, _f, proto, tr = w.connection()
    proto.dataReceived(b"220 mx\r\n")
    w.reactor.advance(4)
    assert not tr.disconnecting
    w.reactor.advance(1)                        # EHLO: min(300, 5)
    assert tr.disconnecting


def test_the_whole_attempt_ends_after_its_lifetime(tmp_path):
    """Replies each just within their own deadline still cannot hold the slot past the
    attempt's lifetime."""
    w = World(tmp_path, rcpts=("a@example.org",), attempt_lifetime=950)
    w.deliver()
    _, _f, proto, tr = w.connection()
    proto.dataReceived(b"220 mx\r\n")
    for reply in (b"250 mx\r\n", b"250 ok\r\n", b"250 ok\r\n"):   # EHLO, MAIL, RCPT
        w.reactor.advance(290)
        proto.dataReceived(reply)
    assert tr.value().endswith(b"DATA\r\n")
    w.reactor.advance(79)                       # 949 s; DATA's own 120 s would end at 990
    assert not tr.disconnecting
    w.reactor.advance(1)
    assert tr.disconnecting
    proto.connectionLost(Failure(error.ConnectionAborted()))
    [r] = w.result()
    assert r.status == DEFERRAL
    assert r.text == ("Connected to 192.0.2.1 but the delivery attempt took longer than "
                      "950 s; gave up. (#4.4.2)")


def test_attempt_lifetime_text_and_no_address_tried_after_it(tmp_path):
    w = World(tmp_path, attempt_lifetime=250)
    w.deliver()
    _, _f, proto, tr = w.connection(0)
    proto.dataReceived(b"220 mx\r\n")
    w.reactor.advance(249)
    assert not tr.disconnecting
    w.reactor.advance(1)
    assert tr.disconnecting
    proto.connectionLost(Failure(error.ConnectionAborted()))
    assert len(w.reactor.tcpClients) == 1      # mx2 is not tried: the attempt is over
    results = w.result()
    assert [r.status for r in results] == [DEFERRAL, DEFERRAL]
    assert results[0].text == ("Connected to 192.0.2.1 but the delivery attempt took longer "
                               "than 250 s; gave up. (#4.4.2)")


def test_message_earns_time_only_as_fast_as_the_server_takes_it(tmp_path):
    """While a large message streams, each chunk the server takes earns time at
    deadline.MIN_DATA_RATE; a reader that stalls is cut off after REPLY_DEADLINES["message"]."""
    body = (b"x" * 99 + b"\n") * 5000 + b".\n"          # 500 KB > PRELOAD_MAX
    w = World(tmp_path, rcpts=("a@example.org",), body=body)
    w.deliver()
    _, _f, proto, tr = w.connection()
    converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250 PIPELINING\r\n"])
    proto.pauseProducing()                     # the server reads nothing
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    w.reactor.advance(sc.REPLY_DEADLINES["message"] - 1)
    assert not tr.disconnecting
    w.reactor.advance(1)
    assert tr.disconnecting
    proto.connectionLost(Failure(error.ConnectionAborted()))
    [r] = w.result()
    assert r.status == DEFERRAL
    assert r.text == ("Connected to 192.0.2.1 but it took in the message too slowly: "
                      "180 s without enough progress. (#4.4.2)")


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


def test_a_stored_long_line_is_sent_re_encoded_with_its_new_size(tmp_path):
    body = b"Subject: x\n\n" + b"z" * 5000 + b"\n"
    w = World(tmp_path, rcpts=("a@example.org",), body=body)
    w.deliver()
    _, _f, proto, tr = w.connection()
    sent = converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250-PIPELINING\r\n250 SIZE\r\n",
                                b"250 ok\r\n250 ok\r\n354 go\r\n"])
    wire = sent[2]
    size = int(re.search(rb"SIZE=(\d+)", sent[1]).group(1))
    assert size > len(body)                            # what is sent, not what is stored
    assert max(len(line) for line in wire.split(b"\r\n")) <= 76
    assert b"\r\nContent-Transfer-Encoding: quoted-printable\r\n" in wire


def test_a_large_message_with_a_long_line_is_re_encoded_not_streamed(tmp_path):
    body = (b"x" * 99 + b"\n") * 3000 + b"q" * 2000 + b"\n"     # 302 KB > PRELOAD_MAX
    w = World(tmp_path, rcpts=("a@example.org",), body=body)
    w.deliver()
    _, _f, proto, tr = w.connection()
    sent = converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250 PIPELINING\r\n",
                                b"250 ok\r\n250 ok\r\n354 go\r\n"])
    assert max(len(line) for line in sent[2].split(b"\r\n")) <= 76
    assert sent[2].endswith(b"\r\n.\r\n")
    assert w.rd._refit.tokens == rm.REFIT_AT_ONCE - 1   # held while it is delivered
    converse(proto, tr, [b"250 ok\r\n", b"221 bye\r\n"])
    finish(proto, tr)
    assert [r.status for r in w.result()] == [SUCCESS]
    assert w.rd._refit.tokens == rm.REFIT_AT_ONCE       # and given back


def test_local_addresses_include_loopback():
    is_me = rm.make_is_me()
    assert is_me("127.0.0.1") and is_me("::1") and is_me("0.0.0.0")
    assert not is_me("192.0.2.1") and not is_me("not an ip")


def test_a_large_message_is_read_for_long_lines_once_not_at_every_attempt(tmp_path):
    """Over PRELOAD_MAX a message is streamed; whether it must be re-encoded first takes a
    read through it, done once per message (LONG_LINE_MEMORY), not at every attempt."""
    body = (b"x" * 99 + b"\n") * 5000 + b".\n"          # 500 KB > PRELOAD_MAX, no long line
    w = World(tmp_path, rcpts=("a@example.org",), body=body)
    opened = []
    real_open = w.queue.open_message

    def counting_open(env, *a, **kw):
        opened.append(env.qid)
        return real_open(env, *a, **kw)
    w.queue.open_message = counting_open
    for attempt in range(3):
        before = len(opened)
        w.rd.deliver(w.env, [0], w.queue).addBoth(w.out.append)
        _, _f, proto, tr = w.connection()
        converse(proto, tr, [b"220 mx\r\n", b"250-mx\r\n250 PIPELINING\r\n",
                             b"250 ok\r\n250 ok\r\n354 go\r\n", b"451 try later\r\n",
                             b"221 bye\r\n"])
        finish(proto, tr)
        assert w.out[attempt][0].status == DEFERRAL
        # the first attempt reads it twice (the scan, then the stream), the others once
        assert len(opened) - before == (2 if attempt == 0 else 1)
    assert list(w.rd._long_lines.values()) == [False]


def test_the_memory_of_long_lines_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(rm, "LONG_LINE_MEMORY", 3)
    w = World(tmp_path, rcpts=("a@example.org",), body=(b"y" * 99 + b"\n") * 3000)
    for n in range(5):
        w.env.qid, w.env.token = 1000 + n, f"t{n}"
        assert result_of(w.rd._has_long_line(FixedSource(), w.env)) is (n % 2 == 1)
    assert list(w.rd._long_lines) == [(1002, "t2"), (1003, "t3"), (1004, "t4")]
    w.env.qid, w.env.token = 1005, ""          # no token (an old queue file): not remembered
    assert result_of(w.rd._has_long_line(FixedSource(), w.env)) is True
    assert (1005, "") not in w.rd._long_lines


class FixedSource:
    """A message source whose odd-numbered messages have a line over MAX_LINE."""

    def open_message(self, env):
        import io
        data = b"z" * 2000 + b"\n" if env.qid % 2 else b"short\n"
        reader = io.BytesIO(data)
        reader.read = lambda n=65536, _r=reader.read: _r(n)
        return reader


def result_of(d):
    out = []
    d.addBoth(out.append)
    return out[0]
