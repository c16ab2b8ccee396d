"""Resolver and DNSBLChecker against the real test DNS server (twisted.names) on 127.0.0.1.

Two independent DNS codecs meet here (dnspython in the client, twisted.names in the server),
over real UDP and TCP sockets on loopback, in the test's reactor; plus the server subprocess
that integration tests use.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mailappliance.access.dnsbl import DNSBLChecker, Refusal
from mailappliance.dns import DNSPermanentError, DNSTemporaryError, Resolver
from mailappliance.testing.dnsserver import DNSServerProcess, DNSTestServer

ZONES = {
    "bl.test": {
        "$minimum": 120,
        "2.0.0.127": [["A", "127.0.0.2"], ["TXT", "spam source, see http://bl.test/"]],
        "big": [["TXT", f"{i:02d}" + "x" * 200] for i in range(12)],     # > 1232 octets
    },
    "bl2.test": {"2.0.0.127": [["A", "127.0.0.3"]]},
    "example.test": {
        "@": [["MX", "20 mx2"], ["MX", "10 mx1"], ["MX", "10 mx1b"]],
        "mx1": [["A", "127.0.0.1"], ["AAAA", "::1"]],
        "alias": [["CNAME", "mx1"]],
    },
    "nomail.test": {"@": [["MX", "0 ."]]},
    "plain.test": {"@": [["A", "127.0.0.5"]]},
}
# Bounds for the stray-datagram test: our hand-made server's receive timeout, and how many
# 10 ms reactor turns the resolver gets to read the unasked datagram (normally one).
STRAY_WAIT = 5.0
STRAY_TURNS = 200


class Base(unittest.TestCase):
    def setUp(self):
        self.server = DNSTestServer(ZONES, reactor)
        self.address = self.server.start()
        self.addCleanup(self.server.stop)

    def resolver(self, **kw):
        kw.setdefault("attempt_timeout", 2)
        r = Resolver(reactor, [self.address], **kw)
        self.addCleanup(r.close)
        return r


class ResolverTests(Base):
    async def test_a_and_nxdomain(self):
        r = self.resolver()
        ans = await r.query("2.0.0.127.bl.test", "A")
        self.assertEqual(ans.addresses(), ["127.0.0.2"])
        nx = await r.query("3.0.0.127.bl.test", "A")
        self.assertTrue(nx.nxdomain)
        self.assertEqual(nx.ttl, 120)                    # the zone's SOA minimum

    async def test_a_big_answer_comes_over_tcp(self):
        r = self.resolver()
        ans = await r.query("big.bl.test", "TXT")
        self.assertEqual(sorted(t[:2] for t in ans.texts()), [f"{i:02d}" for i in range(12)])
        self.assertEqual(self.server.queries, [("big.bl.test", "TXT", "udp"),
                                               ("big.bl.test", "TXT", "tcp")])

    async def test_mx_order_cname_and_null_mx(self):
        r = self.resolver()
        hosts = await r.mx_hosts("example.test")
        self.assertEqual(hosts[-1], (20, "mx2.example.test"))
        self.assertEqual(sorted(hosts[:2]), [(10, "mx1.example.test"), (10, "mx1b.example.test")])
        self.assertEqual(await r.addresses("alias.example.test"), ["127.0.0.1", "::1"])
        self.assertEqual(await r.mx_hosts("plain.test"), [(0, "plain.test")])   # implicit MX
        with self.assertRaises(DNSPermanentError):
            await r.mx_hosts("nomail.test")
        with self.assertRaises(DNSPermanentError):
            await r.mx_hosts("absent.example.test")

    async def test_servfail_is_temporary(self):
        self.server.set_behaviour(mode="servfail")
        with self.assertRaises(DNSTemporaryError) as e:
            await self.resolver(attempts=2).mx_hosts("example.test")
        self.assertIn("SERVFAIL", e.exception.reason)
        self.assertEqual(self.server.count("example.test", "MX"), 2)

    async def test_refused_is_temporary(self):
        self.server.set_behaviour(mode="refused", zone="example.test")
        with self.assertRaises(DNSTemporaryError):
            await self.resolver(attempts=1).mx_hosts("example.test")
        self.assertTrue((await self.resolver().query("2.0.0.127.bl.test", "A")).addresses())

    async def test_a_silent_server_times_out_on_time(self):
        self.server.set_behaviour(mode="drop")
        started = time.monotonic()
        with self.assertRaises(DNSTemporaryError):
            await self.resolver(attempt_timeout=0.2, attempts=2).query("plain.test", "A")
        elapsed = time.monotonic() - started
        self.assertTrue(0.35 < elapsed < 1.5, elapsed)

    async def test_a_closed_port_is_unreachable_at_once(self):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()
        sock.close()                                     # nobody listens there now
        r = Resolver(reactor, [dead], attempt_timeout=5, attempts=1)
        started = time.monotonic()
        with self.assertRaises(DNSTemporaryError) as e:
            await r.query("plain.test", "A")
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIn("unreachable", e.exception.reason)

    async def test_queries_leave_no_log_lines_and_no_open_sockets(self):
        import os

        from twisted.logger import capturedLogs
        r = self.resolver()
        await r.query("warm-up.bl.test", "A")        # the reactor may open its waker pipe once
        fds_before = len(os.listdir("/proc/self/fd"))
        with capturedLogs() as events:
            for i in range(20):
                await r.query(f"{i}.bl.test", "A")
        self.assertEqual([e.get("log_format") for e in events], [])
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds_before)
        r.close()                                    # at shutdown: the pooled socket goes too
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds_before - 1)

    async def test_a_socket_is_reused_only_after_a_clean_answer(self):
        """The UDP socket pool: clean endings go back, anything else is closed for good."""
        from mailappliance.dns import _UDPSocketPool
        r = self.resolver(attempt_timeout=0.2, attempts=1)
        pool = r._open_udp
        self.assertIsInstance(pool, _UDPSocketPool)
        self.addCleanup(pool.close)
        ports = set()
        for i in range(5):
            await r.query(f"{i}.bl.test", "A")
            (sock,) = pool._idle[self.address]
            ports.add(sock.sock.getsockname()[1])
        self.assertEqual((len(ports), pool.idle()), (1, 1))     # one port, one idle socket
        self.assertIn(sock, reactor.getReaders())   # idle, still watched: no epoll_ctl per query
        answers = await defer.gatherResults([r.query(f"c{i}.bl.test", "A") for i in range(6)])
        self.assertEqual(len(answers), 6)
        self.assertEqual(pool.idle(), 6)
        self.server.set_behaviour(mode="drop")
        with self.assertRaises(DNSTemporaryError):
            await r.query("lost.bl.test", "A")
        self.assertEqual(pool.idle(), 5, "a timed-out query's socket is never reused")
        self.server.set_behaviour(mode="servfail")
        with self.assertRaises(DNSTemporaryError):
            await r.query("sf.plain.test", "A")     # a clean reply, though an error: reused
        self.assertEqual(pool.idle(), 5)

    async def test_anything_aimed_at_an_idle_socket_retires_it(self):
        """A pooled socket stays watched while idle; a datagram from its server then (a late
        duplicate or a forgery with the right port) closes it rather than meet the next query."""
        import dns.message
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.settimeout(STRAY_WAIT)
        r = Resolver(reactor, [server.getsockname()], attempt_timeout=2, attempts=1)
        self.addCleanup(r.close)
        pool = r._open_udp
        d = r.query("1.bl.test", "A")                   # sent at once, on a new socket
        wire, client = server.recvfrom(4096)
        reply = dns.message.make_response(dns.message.from_wire(wire))
        server.sendto(reply.to_wire(), client)
        self.assertTrue((await d).nodata)
        self.assertEqual(pool.idle(), 1)
        server.sendto(reply.to_wire(), client)         # the same reply again, now unasked
        for _ in range(STRAY_TURNS):                   # reactor turns until it is read
            if not pool.idle():
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(pool.idle(), 0)
        self.assertEqual([s for s in reactor.getReaders()
                          if getattr(s, "logPrefix", lambda: "")() == "dns-udp"], [])
        d = r.query("2.bl.test", "A")                   # a fresh socket answers
        wire, client2 = server.recvfrom(4096)
        server.sendto(dns.message.make_response(dns.message.from_wire(wire)).to_wire(), client2)
        self.assertTrue((await d).nodata)

    async def test_a_socket_retires_after_max_uses(self):
        from mailappliance.dns import _UDPSocketPool
        self.patch(_UDPSocketPool, "MAX_USES", 3)
        r = self.resolver()
        pool = r._open_udp
        self.addCleanup(pool.close)
        seen = []
        for i in range(7):
            await r.query(f"m{i}.bl.test", "A")
            seen.append(id(pool._idle[self.address][0]) if pool.idle() else None)
        # uses 1, 2 idle; the third use retires it; then a new socket: 1, 2, retire; ...
        self.assertEqual([s is None for s in seen], [False, False, True] * 2 + [False])
        self.assertNotEqual(seen[0], seen[3])

    async def test_delayed_answers_arrive_after_the_delay(self):
        self.server.set_behaviour(delay=0.1)
        started = time.monotonic()
        await self.resolver().query("plain.test", "A")
        self.assertGreaterEqual(time.monotonic() - started, 0.09)

    async def test_concurrent_identical_queries_reach_the_server_once(self):
        self.server.set_behaviour(delay=0.05)
        r = self.resolver()
        answers = await defer.gatherResults(
            [r.query("2.0.0.127.bl.test", "A") for _ in range(10)])
        self.assertEqual({tuple(a.addresses()) for a in answers}, {("127.0.0.2",)})
        self.assertEqual(self.server.count(), 1)


class CheckerTests(Base):
    def checker(self, zones=("bl.test", "bl2.test"), timeout=5, **kw):
        return DNSBLChecker(self.resolver(), reactor, zones, (), timeout=timeout, **kw)

    async def test_listed_with_reason(self):
        refusal = await self.checker().check("127.0.0.2", {})
        self.assertEqual(refusal, Refusal(False, "spam source, see http://bl.test/"))

    async def test_ten_connections_from_one_address_cost_one_query_per_zone(self):
        c = self.checker()
        for _ in range(10):
            self.assertIsNone(await c.check("127.0.0.1", {}))
        self.assertEqual(self.server.count("1.0.0.127.bl.test", "A"), 1)
        self.assertEqual(self.server.count("1.0.0.127.bl2.test", "A"), 1)
        self.assertEqual(self.server.count(), 2)

    async def test_a_silent_list_is_given_up_at_dnsbl_timeout(self):
        self.server.set_behaviour(mode="drop", zone="bl.test")
        c = self.checker(timeout=1)
        started = time.monotonic()
        refusal = await c.check("127.0.0.2", {})
        elapsed = time.monotonic() - started
        self.assertTrue(0.9 < elapsed < 2.0, elapsed)
        # bl.test never answered; bl2.test lists the client without TXT.
        self.assertEqual(refusal, Refusal(False, "client 127.0.0.2 is listed in bl2.test"))

    async def test_lists_are_queried_in_parallel(self):
        self.server.set_behaviour(delay=0.5)
        started = time.monotonic()
        await self.checker().check("127.0.0.1", {})
        # One after the other would take at least 2 x 0.5 s; the margin absorbs a slow machine.
        self.assertLess(time.monotonic() - started, 0.95)
        self.assertEqual(self.server.count(), 2)

    async def test_servfail_fails_open(self):
        self.server.set_behaviour(mode="servfail")
        self.assertIsNone(await self.checker().check("127.0.0.2", {}))


class SubprocessTests(unittest.TestCase):
    """The server as integration tests run it: a child process driven over stdin/stdout."""

    def setUp(self):
        self.proc = DNSServerProcess(ZONES, delay=0.0).start()
        self.addCleanup(self.proc.stop)

    async def test_answers_counts_and_modes(self):
        r = Resolver(reactor, [(self.proc.host, self.proc.port)], attempt_timeout=1, attempts=1)
        self.addCleanup(r.close)
        self.assertEqual((await r.query("2.0.0.127.bl.test", "A")).addresses(), ["127.0.0.2"])
        self.assertEqual(self.proc.count(), 1)
        self.assertEqual(self.proc.count("2.0.0.127.bl.test", "A"), 1)
        self.assertEqual(self.proc.queries(), [("2.0.0.127.bl.test", "A", "udp")])
        self.proc.set_mode("servfail")
        with self.assertRaises(DNSTemporaryError):
            await r.query("plain.test", "A")
        self.proc.set_mode("answer")
        self.proc.reset()
        self.assertEqual((await r.query("plain.test", "A")).addresses(), ["127.0.0.5"])
        self.assertEqual(self.proc.count(), 1)
        self.assertEqual(self.proc.nameserver, f"127.0.0.1:{self.proc.port}")

    def test_stops_when_its_stdin_closes(self):
        proc = self.proc.proc
        self.proc.stop()
        self.assertIsNotNone(proc.returncode)
