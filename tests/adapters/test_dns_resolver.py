"""Resolver over Twisted doubles: a memory reactor with a Clock, UDP sockets we answer by hand.

Proves the wire behaviour without sockets or sleeps: retries and deadlines on the injected
clock, server rotation, reply validation, TCP fallback on TC, EDNS fallback, the cache and the
sharing of identical in-flight queries, and that every socket and timer is released.
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface.verify import verifyObject

from mailappliance.dns import (MAX_NEGATIVE_TTL, DNSPermanentError, DNSTemporaryError,
                               IResolver, Resolver)


class FakeUDPSocket:
    """Stands in for the resolver's connected UDP socket: records what is sent to whom."""

    def __init__(self, server, exchange):
        self.peer = server
        self.exchange = exchange
        self.written: list[bytes] = []
        self.closed = False

    def send(self, data):
        self.written.append(data)

    def close(self):
        self.closed = True

    # test side

    def query(self) -> dns.message.Message:
        return dns.message.from_wire(self.written[-1])

    def reply(self, rcode=dns.rcode.NOERROR, answer=(), authority=(), flags=0, edns=True,
              wire=None):
        if wire is None:
            q = self.query()
            r = dns.message.make_response(q)
            r.set_rcode(rcode)
            if not edns:
                r.use_edns(False)
            r.flags |= flags
            for rr in answer:
                r.answer.append(dns.rrset.from_text(*rr))
            for rr in authority:
                r.authority.append(dns.rrset.from_text(*rr))
            wire = r.to_wire()
        self.exchange.datagram(wire)


class DNSReactor(MemoryReactorClock):
    """MemoryReactorClock plus the resolver's UDP sockets, opened through `open_udp`."""

    def __init__(self):
        super().__init__()
        self.udp: list[FakeUDPSocket] = []

    def open_udp(self, server, exchange):
        sock = FakeUDPSocket(server, exchange)
        self.udp.append(sock)
        return sock


SERVERS = [("192.0.2.53", 53), ("198.51.100.53", 5353)]
SOA = ("bl.test.", 600, "IN", "SOA", "ns.bl.test. h.bl.test. 1 3600 600 86400 60")


@pytest.fixture
def reactor():
    return DNSReactor()


def make(reactor, servers=SERVERS[:1], **kw):
    kw.setdefault("attempt_timeout", 2)
    kw.setdefault("attempts", 2)
    return Resolver(reactor, servers, udp_opener=reactor.open_udp, **kw)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_provides_the_interface(reactor):
    assert verifyObject(IResolver, make(reactor))


def test_a_query_goes_over_a_connected_udp_socket_and_is_answered(reactor):
    r = make(reactor)
    d = r.query("2.0.0.127.bl.test", "A")
    (port,) = reactor.udp
    assert port.peer == SERVERS[0]
    q = port.query()
    assert q.question[0].name.to_text() == "2.0.0.127.bl.test." and q.edns == 0
    assert not d.called
    port.reply(answer=[("2.0.0.127.bl.test.", 300, "IN", "A", "127.0.0.2")])
    ans = result_of(d)
    assert ans.addresses() == ["127.0.0.2"] and ans.ttl == 300
    assert port.closed and not reactor.getDelayedCalls()


def test_timeout_moves_to_the_next_server(reactor):
    r = make(reactor, SERVERS)
    d = r.query("a.test", "A")
    reactor.advance(1.9)
    assert len(reactor.udp) == 1
    reactor.advance(0.1)
    assert len(reactor.udp) == 2 and reactor.udp[0].closed
    assert reactor.udp[1].peer == SERVERS[1]
    reactor.udp[1].reply(answer=[("a.test.", 60, "IN", "A", "192.0.2.1")])
    assert result_of(d).addresses() == ["192.0.2.1"]
    assert r.stats["timeouts"] == 1


def test_a_dead_server_fails_temporarily_after_every_try_and_leaves_nothing_behind(reactor):
    r = make(reactor, SERVERS, attempt_timeout=1, attempts=2)
    d = r.query("a.test", "A")
    for _ in range(4):
        reactor.advance(1)
    err = result_of(d)
    assert err.check(DNSTemporaryError) and "timeout" in err.value.reason
    assert len(reactor.udp) == 4 and all(p.closed for p in reactor.udp)
    assert [p.peer for p in reactor.udp] == SERVERS * 2
    assert not reactor.getDelayedCalls()


def test_the_overall_timeout_bounds_all_tries(reactor):
    r = make(reactor, SERVERS, attempt_timeout=5, attempts=5)
    d = r.query("a.test", "A", timeout=3)
    reactor.advance(2.999)
    assert not d.called
    reactor.advance(0.001)
    assert result_of(d).check(DNSTemporaryError)
    assert not reactor.getDelayedCalls()


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED])
def test_servfail_and_refused_try_the_next_server(reactor, rcode):
    r = make(reactor, SERVERS)
    d = r.query("a.test", "A")
    reactor.udp[0].reply(rcode)
    assert len(reactor.udp) == 2
    reactor.udp[1].reply(answer=[("a.test.", 60, "IN", "A", "192.0.2.1")])
    assert result_of(d).addresses() == ["192.0.2.1"]


def test_servfail_everywhere_is_temporary_and_names_the_rcode(reactor):
    r = make(reactor, SERVERS, attempts=1)
    d = r.query("a.test", "A")
    reactor.udp[0].reply(dns.rcode.SERVFAIL)
    reactor.udp[1].reply(dns.rcode.SERVFAIL)
    err = result_of(d)
    assert err.check(DNSTemporaryError) and "SERVFAIL from 192.0.2.53:53" in err.value.reason


def test_unreachable_server_moves_on_at_once(reactor):
    r = make(reactor, SERVERS)
    d = r.query("a.test", "A")
    reactor.udp[0].exchange.unreachable()        # ICMP port unreachable
    assert len(reactor.udp) == 2 and reactor.udp[0].closed
    reactor.udp[1].reply(answer=[("a.test.", 60, "IN", "A", "192.0.2.1")])
    assert result_of(d).addresses() == ["192.0.2.1"]


def test_forged_or_stale_datagrams_are_ignored(reactor):
    r = make(reactor)
    d = r.query("a.test", "A")
    port = reactor.udp[0]
    q = port.query()
    wrong = dns.message.make_response(q)
    wrong.id = (q.id + 1) % 65536
    wrong.answer.append(dns.rrset.from_text("a.test.", 60, "IN", "A", "6.6.6.6"))
    port.reply(wire=wrong.to_wire())
    port.reply(wire=b"garbage")
    assert not d.called
    port.reply(answer=[("a.test.", 60, "IN", "A", "192.0.2.1")])
    assert result_of(d).addresses() == ["192.0.2.1"]


def test_a_server_sending_only_garbage_is_given_up(reactor):
    r = make(reactor, attempts=1)
    d = r.query("a.test", "A")
    for _ in range(16):
        reactor.udp[0].reply(wire=b"\x00" * 3)
    assert result_of(d).check(DNSTemporaryError)


def test_truncated_answer_is_asked_again_over_tcp(reactor):
    r = make(reactor)
    d = r.query("big.test", "TXT")
    reactor.udp[0].reply(flags=dns.flags.TC)
    assert reactor.udp[0].closed
    (host, port, factory, timeout, _bind) = reactor.tcpClients[0]
    assert (host, port) == SERVERS[0]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    sent = transport.value()
    (length,) = struct.unpack("!H", sent[:2])
    q = dns.message.from_wire(sent[2:2 + length])
    assert q.question[0].name.to_text() == "big.test."
    reply = dns.message.make_response(q)
    reply.answer.append(dns.rrset.from_text("big.test.", 60, "IN", "TXT",
                                            *[f'"{"x" * 200}{i}"' for i in range(10)]))
    wire = reply.to_wire(max_size=65535)
    framed = struct.pack("!H", len(wire)) + wire
    proto.dataReceived(framed[:1])                      # arrives in pieces
    proto.dataReceived(framed[1:300])
    assert not d.called
    proto.dataReceived(framed[300:])
    assert len(result_of(d).texts()) == 10
    assert transport.disconnecting and r.stats["sent_tcp"] == 1


def test_tcp_connection_closed_early_is_temporary(reactor):
    r = make(reactor, attempts=1)
    d = r.query("big.test", "TXT")
    reactor.udp[0].reply(flags=dns.flags.TC)
    proto = reactor.tcpClients[0][2].buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.connectionLost(None)
    err = result_of(d)
    assert err.check(DNSTemporaryError) and "TCP" in err.value.reason


def test_formerr_from_an_old_server_retries_without_edns(reactor):
    r = make(reactor)
    d = r.query("a.test", "A")
    reactor.udp[0].reply(dns.rcode.FORMERR, edns=False)
    assert len(reactor.udp) == 2 and reactor.udp[1].query().edns < 0
    reactor.udp[1].reply(answer=[("a.test.", 60, "IN", "A", "192.0.2.1")], edns=False)
    assert result_of(d).addresses() == ["192.0.2.1"]


def test_answers_are_cached_for_their_ttl(reactor):
    r = make(reactor)
    d = r.query("a.test", "A")
    reactor.udp[0].reply(answer=[("a.test.", 30, "IN", "A", "192.0.2.1")])
    result_of(d)
    reactor.advance(29)
    assert result_of(r.query("A.TEST.", "a")).addresses() == ["192.0.2.1"]
    assert len(reactor.udp) == 1 and r.stats["cache_hits"] == 1
    reactor.advance(1)
    r.query("a.test", "A")
    assert len(reactor.udp) == 2


def test_nxdomain_is_an_answer_cached_for_the_soa_minimum(reactor):
    r = make(reactor)
    d = r.query("5.0.0.127.bl.test", "A")
    reactor.udp[0].reply(dns.rcode.NXDOMAIN, authority=[SOA])
    ans = result_of(d)
    assert ans.nxdomain and ans.ttl == 60
    reactor.advance(59)
    assert result_of(r.query("5.0.0.127.bl.test", "A")).nxdomain
    assert len(reactor.udp) == 1
    reactor.advance(1)
    r.query("5.0.0.127.bl.test", "A")
    assert len(reactor.udp) == 2


def test_negative_caching_is_capped(reactor):
    r = make(reactor)
    d = r.query("5.0.0.127.bl.test", "A")
    soa = ("bl.test.", 999999, "IN", "SOA", "ns.bl.test. h.bl.test. 1 3600 600 86400 999999")
    reactor.udp[0].reply(dns.rcode.NXDOMAIN, authority=[soa])
    result_of(d)
    reactor.advance(MAX_NEGATIVE_TTL)
    r.query("5.0.0.127.bl.test", "A")
    assert len(reactor.udp) == 2


def test_failures_are_not_cached(reactor):
    r = make(reactor, attempts=1)
    d = r.query("a.test", "A")
    reactor.udp[0].reply(dns.rcode.SERVFAIL)
    result_of(d)
    r.query("a.test", "A")
    assert len(reactor.udp) == 2


def test_identical_queries_in_flight_share_one_packet(reactor):
    r = make(reactor)
    waiters = [r.query("2.0.0.127.bl.test", "A") for _ in range(10)]
    assert len(reactor.udp) == 1 and r.stats["shared"] == 9
    reactor.udp[0].reply(answer=[("2.0.0.127.bl.test.", 60, "IN", "A", "127.0.0.2")])
    assert all(result_of(w).addresses() == ["127.0.0.2"] for w in waiters)


def test_a_shared_failure_reaches_every_waiter(reactor):
    r = make(reactor, attempts=1)
    waiters = [r.query("a.test", "A") for _ in range(3)]
    reactor.udp[0].reply(dns.rcode.SERVFAIL)
    assert all(result_of(w).check(DNSTemporaryError) for w in waiters)


def test_cancelling_one_waiter_leaves_the_others_and_the_last_one_stops_the_lookup(reactor):
    r = make(reactor)
    first, second = r.query("a.test", "A"), r.query("a.test", "A")
    first.cancel()
    assert result_of(first).check(defer.CancelledError)
    assert not reactor.udp[0].closed and not second.called
    second.cancel()
    assert result_of(second).check(defer.CancelledError)
    assert reactor.udp[0].closed and not reactor.getDelayedCalls()
    # A new query after that starts afresh.
    r.query("a.test", "A")
    assert len(reactor.udp) == 2


def test_mx_hosts_and_addresses_go_through_query(reactor):
    r = make(reactor)
    d = r.mx_hosts("Example.TEST")
    reactor.udp[0].reply(answer=[("example.test.", 60, "IN", "MX", "10 mx1.example.test.",
                                  "5 mx0.example.test.")])
    assert result_of(d) == [(5, "mx0.example.test"), (10, "mx1.example.test")]
    d = r.addresses("mx0.example.test")
    a_port, aaaa_port = reactor.udp[1], reactor.udp[2]          # A and AAAA in parallel
    assert a_port.query().question[0].rdtype == dns.rdatatype.A
    aaaa_port.reply(answer=[("mx0.example.test.", 60, "IN", "AAAA", "2001:db8::25")])
    a_port.reply(answer=[("mx0.example.test.", 60, "IN", "A", "192.0.2.25")])
    assert result_of(d) == ["192.0.2.25", "2001:db8::25"]


def test_null_mx_and_nxdomain_are_permanent(reactor):
    r = make(reactor)
    d = r.mx_hosts("nomail.test")
    reactor.udp[0].reply(answer=[("nomail.test.", 60, "IN", "MX", "0 .")])
    assert result_of(d).check(DNSPermanentError)
    d = r.mx_hosts("gone.test")
    reactor.udp[1].reply(dns.rcode.NXDOMAIN)
    assert result_of(d).check(DNSPermanentError)


def test_address_literals_need_no_lookup(reactor):
    r = make(reactor)
    assert result_of(r.addresses("[192.0.2.7]")) == ["192.0.2.7"]
    assert result_of(r.addresses("2001:DB8::7")) == ["2001:db8::7"]
    assert reactor.udp == []


def test_bad_names_fail_permanently_without_a_packet(reactor):
    r = make(reactor)
    assert result_of(r.query("a..b", "A")).check(DNSPermanentError)
    assert result_of(r.mx_hosts("x" * 64 + ".test")).check(DNSPermanentError)
    assert reactor.udp == []


def test_rotate_spreads_first_tries_over_servers(reactor, tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.1\nnameserver 192.0.2.2\noptions rotate\n")
    r = Resolver(reactor, (), resolv_conf=str(conf), udp_opener=reactor.open_udp)
    r.query("a.test", "A")
    r.query("b.test", "A")
    assert [p.peer for p in reactor.udp] == [("192.0.2.1", 53), ("192.0.2.2", 53)]


def test_empty_nameservers_setting_reads_resolv_conf(reactor, tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 203.0.113.9\noptions timeout:3 attempts:4\n")
    r = Resolver(reactor, (), resolv_conf=str(conf))
    assert r.nameservers == (("203.0.113.9", 53),)
    assert (r.attempt_timeout, r.attempts) == (3.0, 4)


def test_reload_switches_nameservers_and_drops_the_cache(reactor):
    import dataclasses
    from pathlib import Path

    from mailappliance.config import DNSSettings, Settings

    r = make(reactor)
    d = r.query("a.test", "A")
    reactor.udp[0].reply(answer=[("a.test.", 300, "IN", "A", "192.0.2.1")])
    result_of(d)
    settings = Settings(hostname="mx.test", data=Path("/tmp"))
    r.reload(dataclasses.replace(settings, dns=DNSSettings(nameservers=(SERVERS[0],))))
    assert len(r.cache) == 1                               # same servers: cache kept
    r.reload(dataclasses.replace(settings, dns=DNSSettings(nameservers=(SERVERS[1],))))
    assert r.nameservers == (SERVERS[1],) and len(r.cache) == 0
    r.query("a.test", "A")
    assert reactor.udp[-1].peer == SERVERS[1]


def test_a_send_error_counts_as_unreachable(reactor):
    class Failing(FakeUDPSocket):
        def send(self, data):
            raise OSError(101, "Network is unreachable")

    def opener(server, exchange):
        sock = Failing(server, exchange)
        reactor.udp.append(sock)
        return sock
    r = Resolver(reactor, SERVERS, attempts=1, udp_opener=opener)
    err = result_of(r.query("a.test", "A"))
    assert err.check(DNSTemporaryError) and "Network is unreachable" in err.value.reason
    assert all(s.closed for s in reactor.udp) and not reactor.getDelayedCalls()


def test_no_nameserver_fails_temporarily_and_says_why(reactor):
    r = Resolver(reactor, (), resolv_conf="/nonexistent", udp_opener=reactor.open_udp)
    r.nameservers = ()
    err = result_of(r.query("a.test", "A"))
    assert err.check(DNSTemporaryError) and "no nameserver" in err.value.reason


def test_an_undecodable_reply_moves_on_to_the_next_server(reactor):
    r = make(reactor, SERVERS)
    d = r.query("a.test", "TXT")
    q = dns.message.from_wire(reactor.udp[0].written[-1])
    good = dns.message.make_response(q).to_wire()
    # Header and question match, but the answer count promises a record that is not there.
    reactor.udp[0].reply(wire=good[:6] + b"\x00\x01" + good[8:])
    assert len(reactor.udp) == 2
    reactor.udp[1].reply(answer=[("a.test.", 60, "IN", "TXT", '"ok"')])
    assert result_of(d).texts() == ["ok"]
