"""DNS: a small asynchronous stub resolver, dnspython as the codec, Twisted UDP/TCP as transport.

Two halves in one file, so the path of one query reads top to bottom:

- the pure part (no sockets, no reactor, no clock reads): resolv.conf parsing, query building,
  response checking, answer extraction with negative-TTL computation, the TTL cache, and the MX
  ordering rules of RFC 5321 section 5.1 and RFC 7505 (null MX);
- the adapter: `Resolver`, which sends each query over its own connected UDP socket, falls back to
  TCP when the answer is truncated, retries the next nameserver on timeout, SERVFAIL or REFUSED,
  and never blocks the reactor. Time comes from the injected reactor (`callLater`, `seconds`), so
  tests drive timeouts with `twisted.internet.task.Clock`.

Errors: `DNSTemporaryError` (SERVFAIL, REFUSED, timeout, unreachable server, garbage) and
`DNSPermanentError` (NXDOMAIN for MX/address lookups, null MX, no address at all). `query()`
itself returns NXDOMAIN and NODATA as answers, because a DNSBL needs them as "not listed".

The cache holds NOERROR and NXDOMAIN answers for their TTL (negative answers for the SOA
minimum, RFC 2308), bounded in entries and in lifetime; concurrent identical queries share one
packet on the wire, so a flood of connections from one address costs one lookup.
"""

from __future__ import annotations

import ipaddress
import random
import secrets
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from twisted.internet import defer, error, protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

# --- limits, each with its source ---------------------------------------------------------------

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53
# glibc resolv.h: MAXNS 3 nameservers are used, the rest of resolv.conf's list is ignored.
MAX_NAMESERVERS = 3
# glibc resolv.h: RES_TIMEOUT 5 s per try, RES_DFLRETRY 2 tries per server (resolv.conf(5)).
DEFAULT_ATTEMPT_TIMEOUT = 5.0
DEFAULT_ATTEMPTS = 2
# resolv.conf(5) caps "timeout:" at 30 s and "attempts:" at 5.
MAX_ATTEMPT_TIMEOUT = 30.0
MAX_ATTEMPTS = 5
# Overall bound of one query() across all servers and tries, unless the caller gives its own.
DEFAULT_TIMEOUT = 30.0
# EDNS0 payload size recommended by DNS Flag Day 2020 (avoids IP fragmentation).
EDNS_PAYLOAD = 1232
# A TCP answer carries a 16-bit length (RFC 1035 section 4.2.2), so it is at most 65,535 octets.
MAX_TCP_MESSAGE = 65535
# Datagrams from the connected server that fail to parse or do not match the question are
# ignored (they may be stale or forged); after this many we give up on that server.
MAX_IGNORED_DATAGRAMS = 16
# Cache bounds: entries (a DNSBL lookup is 1-2 entries, an MX lookup 3-5), and lifetimes from
# Unbound's defaults: cache-max-ttl 86400, cache-max-negative-ttl 3600 (RFC 2308 section 5
# suggests one to three hours for negative answers).
DEFAULT_CACHE_ENTRIES = 10000
MAX_CACHE_TTL = 86400
MAX_NEGATIVE_TTL = 3600


# --- errors and answers -------------------------------------------------------------------------

class DNSError(Exception):
    """Base of our DNS errors: `name` queried, `reason` in words (for logs and bounces)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class DNSTemporaryError(DNSError):
    """SERVFAIL, REFUSED, timeout, unreachable or unusable server: try again later."""


class DNSPermanentError(DNSError):
    """NXDOMAIN (for MX/addresses), null MX (RFC 7505), or a host without any address."""


@dataclass(frozen=True)
class Answer:
    """One definitive answer: rcode NOERROR (records may be empty: NODATA) or NXDOMAIN.

    `ttl` is how long the answer may be cached: the smallest TTL of the records and CNAMEs for a
    positive answer, min(SOA TTL, SOA minimum) for a negative one (RFC 2308 section 5).
    """

    name: str                            # queried name, lower case, no trailing dot
    rdtype: int
    rcode: int
    records: tuple[dns.rdata.Rdata, ...]
    ttl: int
    canonical_name: str

    @property
    def nxdomain(self) -> bool:
        return self.rcode == dns.rcode.NXDOMAIN

    @property
    def nodata(self) -> bool:
        return self.rcode == dns.rcode.NOERROR and not self.records

    def texts(self) -> list[str]:
        """TXT records, each with its strings joined, as text (undecodable bytes escaped)."""
        out = []
        for r in self.records:
            if r.rdtype == dns.rdatatype.TXT:
                out.append(b"".join(r.strings).decode("utf-8", "backslashreplace"))
        return out

    def addresses(self) -> list[str]:
        return [r.address for r in self.records
                if r.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)]


# --- the pure part ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[tuple[str, int], ...]
    attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT
    attempts: int = DEFAULT_ATTEMPTS
    rotate: bool = False


def parse_resolv_conf(text: str) -> ResolvConf:
    """The parts of resolv.conf(5) a stub resolver needs: nameserver lines and options.

    Without any usable nameserver line the answer is the local host, as glibc does.
    """
    servers: list[tuple[str, int]] = []
    attempt_timeout, attempts, rotate = DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_ATTEMPTS, False
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if not words:
            continue
        if words[0] == "nameserver" and len(words) >= 2:
            host = words[1].split("%", 1)[0]     # drop an IPv6 zone index
            if _ip_literal(host) and len(servers) < MAX_NAMESERVERS:
                servers.append((host, DNS_PORT))
        elif words[0] == "options":
            for opt in words[1:]:
                name, _, value = opt.partition(":")
                if name == "timeout" and value.isdigit():
                    attempt_timeout = float(min(max(int(value), 1), int(MAX_ATTEMPT_TIMEOUT)))
                elif name == "attempts" and value.isdigit():
                    attempts = min(max(int(value), 1), MAX_ATTEMPTS)
                elif name == "rotate":
                    rotate = True
    if not servers:
        servers = [("127.0.0.1", DNS_PORT)]
    return ResolvConf(tuple(servers), attempt_timeout, attempts, rotate)


def _ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def normalize_name(name: str) -> str:
    """Lower case, no trailing dot; raises ValueError for a name DNS cannot carry."""
    try:
        n = dns.name.from_text(name.rstrip(".") + ".") if name not in ("", ".") else dns.name.root
    except (dns.exception.DNSException, UnicodeError) as e:
        raise ValueError(f"bad DNS name {name!r}: {e}") from None
    return n.to_text(omit_final_dot=True).lower() if n != dns.name.root else "."


def rdtype_of(rdtype: int | str) -> int:
    if isinstance(rdtype, str):
        return int(dns.rdatatype.from_text(rdtype.upper()))
    return int(rdtype)


def make_query(name: str, rdtype: int, use_edns: bool = True) -> dns.message.QueryMessage:
    """A recursive query with an unpredictable 16-bit id (RFC 5452 section 9.2)."""
    q = dns.message.make_query(name + "." if name != "." else name, rdtype,
                               use_edns=0 if use_edns else False, payload=EDNS_PAYLOAD)
    q.id = secrets.randbits(16)
    return q


def header_of(wire: bytes) -> tuple[int, int] | None:
    """(id, flags) of a DNS message, or None if it is too short to be one."""
    if len(wire) < 12:
        return None
    return struct.unpack("!HH", wire[:4])


def is_truncated_reply(wire: bytes, query: dns.message.Message) -> bool:
    """A reply to `query` with TC set: switch to TCP (RFC 1035 section 4.2.1, RFC 7766)."""
    head = header_of(wire)
    return (head is not None and head[0] == query.id and bool(head[1] & dns.flags.QR)
            and bool(head[1] & dns.flags.TC))


def parse_reply(wire: bytes, query: dns.message.Message) -> dns.message.Message | None:
    """The reply if `wire` parses and answers `query` (id, opcode, question); else None."""
    try:
        reply = dns.message.from_wire(wire, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, struct.error, UnicodeError):
        return None
    try:
        if not query.is_response(reply):
            return None
    except dns.exception.DNSException:
        return None
    return reply


def answer_from_reply(name: str, rdtype: int, reply: dns.message.Message) -> Answer:
    """Extract the answer for (name, rdtype), following CNAMEs inside the reply.

    Raises DNSTemporaryError for an rcode other than NOERROR/NXDOMAIN or an inconsistent reply.
    """
    rcode = reply.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise DNSTemporaryError(name, dns.rcode.to_text(rcode))
    try:
        chain = reply.resolve_chaining()
    except dns.message.ChainTooLong:
        raise DNSTemporaryError(name, "CNAME chain too long") from None
    except dns.message.AnswerForNXDOMAIN:
        raise DNSTemporaryError(name, "NXDOMAIN with an answer") from None
    except dns.exception.DNSException as e:
        raise DNSTemporaryError(name, f"unusable reply: {e}") from None
    records = tuple(chain.answer) if chain.answer is not None else ()
    ttl = max(0, int(chain.minimum_ttl))
    return Answer(name=name, rdtype=rdtype, rcode=rcode, records=records, ttl=ttl,
                  canonical_name=chain.canonical_name.to_text(omit_final_dot=True).lower())


def cache_lifetime(answer: Answer) -> int:
    """Seconds to keep `answer`: its TTL, capped (negative answers harder, RFC 2308)."""
    if answer.nxdomain or answer.nodata:
        return min(answer.ttl, MAX_NEGATIVE_TTL)
    return min(answer.ttl, MAX_CACHE_TTL)


class TTLCache:
    """A size-bounded cache whose entries expire; least recently used goes first when full.

    Pure: the current time is an argument of every call.
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        self.max_entries = max_entries
        self._data: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable, now: float) -> Any | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        expires, value = hit
        if now >= expires:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any, now: float, lifetime: float) -> None:
        if lifetime <= 0 or self.max_entries == 0:
            return
        self._data[key] = (now + lifetime, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


def mx_order(domain: str, answer: Answer, rng: random.Random) -> list[tuple[int, str]]:
    """MX targets for delivery to `domain`, from the answer to its MX query.

    - NXDOMAIN: permanent (the domain does not exist).
    - No MX records (NODATA): the domain itself with preference 0, the implicit MX of
      RFC 5321 section 5.1.
    - A null MX (one MX "0 .", RFC 7505 section 3): permanent, the domain accepts no mail.
      A "." among real MX records breaks RFC 7505's "MUST NOT"; we skip it and use the others.
    - Otherwise lowest preference first; equal preferences in random order (RFC 5321 5.1).
    """
    if answer.nxdomain:
        raise DNSPermanentError(domain, "domain does not exist (NXDOMAIN)")
    mxs = [r for r in answer.records if r.rdtype == dns.rdatatype.MX]
    if not mxs:
        return [(0, domain)]
    real = [(int(r.preference), r.exchange.to_text(omit_final_dot=True).lower())
            for r in mxs if r.exchange != dns.name.root]
    if not real:
        raise DNSPermanentError(domain, "domain accepts no mail (null MX, RFC 7505)")
    by_pref: dict[int, list[str]] = {}
    for pref, host in real:
        hosts = by_pref.setdefault(pref, [])
        if host not in hosts:
            hosts.append(host)
    out: list[tuple[int, str]] = []
    for pref in sorted(by_pref):
        hosts = by_pref[pref]
        rng.shuffle(hosts)
        out.extend((pref, h) for h in hosts)
    return out


def merge_addresses(host: str, a: Answer | DNSError, aaaa: Answer | DNSError) -> list[str]:
    """A records first, then AAAA (as qmail-remote: IPv4 first). Raise if nothing usable.

    A temporary failure of one family does not hide the other family's addresses; with no
    address at all, any temporary failure makes the whole lookup temporary.
    """
    found: list[str] = []
    for result in (a, aaaa):
        if isinstance(result, Answer):
            found.extend(x for x in result.addresses() if x not in found)
    if found:
        return found
    temporary = [r for r in (a, aaaa) if isinstance(r, DNSTemporaryError)]
    if temporary:
        raise DNSTemporaryError(host, temporary[0].reason)
    if all(isinstance(r, Answer) and r.nxdomain for r in (a, aaaa)):
        raise DNSPermanentError(host, "host does not exist (NXDOMAIN)")
    raise DNSPermanentError(host, "host has no A or AAAA record")


# --- the interface ------------------------------------------------------------------------------

class IResolver(Interface):
    """What the rest of the appliance uses: app.resolver (DNSBL, remote delivery)."""

    def query(name, rdtype, timeout=None):
        """Deferred[Answer] (NOERROR or NXDOMAIN); fails with DNSTemporaryError."""

    def mx_hosts(domain, timeout=None):
        """Deferred[list[(preference, host)]] in delivery order; DNSPermanentError for NXDOMAIN
        and null MX, DNSTemporaryError for SERVFAIL/timeout/REFUSED."""

    def addresses(host, timeout=None):
        """Deferred[list[str]]: A addresses, then AAAA; an IP literal is returned as itself."""


class ResolverBase:
    """mx_hosts() and addresses() on top of a subclass's query(): shared by fakes and the real one.

    Subclasses provide `query(name, rdtype, timeout=None)` and `self.rng`.
    """

    rng: random.Random

    def query(self, name: str, rdtype: int | str, timeout: float | None = None):
        raise NotImplementedError

    def mx_hosts(self, domain: str, timeout: float | None = None) -> Deferred:
        try:
            domain = normalize_name(domain)
        except ValueError as e:
            return defer.fail(DNSPermanentError(domain, str(e)))
        d = self.query(domain, dns.rdatatype.MX, timeout)
        d.addCallback(lambda answer: mx_order(domain, answer, self.rng))
        return d

    def addresses(self, host: str, timeout: float | None = None) -> Deferred:
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if _ip_literal(literal):
            return defer.succeed([str(ipaddress.ip_address(literal))])
        try:
            host = normalize_name(host)
        except ValueError as e:
            return defer.fail(DNSPermanentError(host, str(e)))

        def settle(d: Deferred) -> Deferred:
            # A DNS error of one family becomes a value, so the other family still counts.
            def keep(failure: Failure) -> DNSError:
                failure.trap(DNSError)
                return failure.value
            return d.addErrback(keep)

        both = [settle(self.query(host, t, timeout))
                for t in (dns.rdatatype.A, dns.rdatatype.AAAA)]
        d = defer.gatherResults(both, consumeErrors=True)
        d.addCallback(lambda results: merge_addresses(host, results[0], results[1]))
        return d


# --- the adapter: Twisted transport -------------------------------------------------------------

def _settings_nameservers(nameservers: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """IP literals as given; a host name (e.g. "localhost") is resolved once, at start-up."""
    out = []
    for host, port in nameservers:
        if _ip_literal(host):
            out.append((str(ipaddress.ip_address(host)), int(port)))
            continue
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)  # start-up only
        out.append((infos[0][4][0], int(port)))
    return tuple(out)


def _read_resolv_conf(path: str) -> ResolvConf:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_resolv_conf(f.read())
    except OSError:
        return parse_resolv_conf("")


@implementer(IResolver)
class Resolver(ResolverBase):
    """The real resolver: `Resolver(reactor, nameservers=settings.dns.nameservers)`.

    nameservers: (host, port) pairs; empty means /etc/resolv.conf (read once, here).
    timeout: default overall bound of one query() (each call may pass its own).
    The reactor provides listenUDP, connectTCP, callLater and seconds.
    """

    log = Logger()

    def __init__(self, reactor, nameservers: Sequence[tuple[str, int]] = (),
                 timeout: float = DEFAULT_TIMEOUT, *, attempt_timeout: float | None = None,
                 attempts: int | None = None, resolv_conf: str = RESOLV_CONF,
                 cache_entries: int = DEFAULT_CACHE_ENTRIES, rng: random.Random | None = None,
                 ) -> None:
        self._reactor = reactor
        if nameservers:
            conf = ResolvConf(_settings_nameservers(nameservers))
        else:
            conf = _read_resolv_conf(resolv_conf)
        self.nameservers = conf.nameservers
        self.timeout = float(timeout)
        self.attempt_timeout = float(attempt_timeout or conf.attempt_timeout)
        self.attempts = int(attempts or conf.attempts)
        self.rotate = conf.rotate
        self.rng = rng or random.SystemRandom()
        self.cache = TTLCache(cache_entries)
        self._inflight: dict[tuple[str, int], _Flight] = {}
        self._next_server = 0
        # Counters for `stat`, benchmarks and tests.
        self.stats = {"queries": 0, "cache_hits": 0, "shared": 0, "sent_udp": 0,
                      "sent_tcp": 0, "timeouts": 0, "failures": 0}

    def reload(self, settings) -> None:
        """`mailappliance reload`: new [dns] nameservers take effect (and start a fresh cache)."""
        if settings.dns.nameservers:
            servers = _settings_nameservers(settings.dns.nameservers)
        else:
            servers = _read_resolv_conf(RESOLV_CONF).nameservers
        if servers != self.nameservers:
            self.nameservers = servers
            self.cache.clear()

    # public API

    def query(self, name: str, rdtype: int | str, timeout: float | None = None) -> Deferred:
        try:
            qname = normalize_name(name)
            qtype = rdtype_of(rdtype)
        except (ValueError, dns.exception.DNSException) as e:
            return defer.fail(DNSPermanentError(str(name), str(e)))
        self.stats["queries"] += 1
        key = (qname, qtype)
        cached = self.cache.get(key, self._reactor.seconds())
        if cached is not None:
            self.stats["cache_hits"] += 1
            return defer.succeed(cached)
        flight = self._inflight.get(key)
        if flight is not None:
            self.stats["shared"] += 1
            return flight.waiter()
        op = Deferred.fromCoroutine(
            self._resolve(qname, qtype, self.timeout if timeout is None else timeout))
        op.addCallback(self._store, key)
        flight = _Flight(op)
        waiter = flight.waiter()
        if not op.called:
            self._inflight[key] = flight
            op.addBoth(self._landed, key)
        flight.start()
        return waiter

    def _landed(self, result, key):
        self._inflight.pop(key, None)
        return result

    def _store(self, answer: Answer, key) -> Answer:
        self.cache.put(key, answer, self._reactor.seconds(), cache_lifetime(answer))
        return answer

    # one lookup across servers and tries

    def _server_order(self) -> list[tuple[str, int]]:
        servers = list(self.nameservers)
        if self.rotate and servers:
            k = self._next_server % len(servers)
            self._next_server += 1
            servers = servers[k:] + servers[:k]
        return servers

    async def _resolve(self, name: str, rdtype: int, timeout: float) -> Answer:
        deadline = self._reactor.seconds() + timeout
        problems: list[str] = []
        for _ in range(self.attempts):
            for server in self._server_order():
                remaining = deadline - self._reactor.seconds()
                if remaining <= 0:
                    break
                try:
                    reply = await self._exchange(name, rdtype, server,
                                                 min(self.attempt_timeout, remaining))
                    return answer_from_reply(name, rdtype, reply)
                except DNSTemporaryError as e:
                    problems.append(f"{e.reason} from {_where(server)}")
        self.stats["failures"] += 1
        # The last few reasons are enough for a log line and a bounce.
        raise DNSTemporaryError(name, "; ".join(problems[-3:]) or "timeout")

    async def _exchange(self, name: str, rdtype: int, server: tuple[str, int],
                        timeout: float) -> dns.message.Message:
        """One question to one server: UDP, then TCP if truncated; FORMERR -> retry w/o EDNS."""
        deadline = self._reactor.seconds() + timeout
        use_edns = True
        while True:
            query = make_query(name, rdtype, use_edns)
            try:
                self.stats["sent_udp"] += 1
                reply = await self._udp(query, server, deadline - self._reactor.seconds())
                if reply is _TRUNCATED:
                    self.stats["sent_tcp"] += 1
                    reply = await self._tcp(query, server, deadline - self._reactor.seconds())
            except defer.TimeoutError:
                self.stats["timeouts"] += 1
                raise DNSTemporaryError(name, "timeout") from None
            if use_edns and reply.rcode() == dns.rcode.FORMERR and reply.edns < 0:
                use_edns = False        # an old server without EDNS0 (RFC 6891 section 7)
                continue
            return reply

    def _udp(self, query: dns.message.Message, server: tuple[str, int],
             timeout: float) -> Deferred:
        host, _ = server
        v6 = ":" in host
        if ipaddress.ip_address(host).is_loopback:
            interface = "::1" if v6 else "127.0.0.1"   # stay on loopback for a local server
        else:
            interface = "::" if v6 else ""
        exchange = _UDPExchange(query, server)
        try:
            udp_port = self._reactor.listenUDP(0, exchange, interface=interface)
        except error.CannotListenError as e:
            return defer.fail(DNSTemporaryError(_qname(query), f"no UDP socket: {e}"))
        d = exchange.result
        d.addTimeout(max(timeout, 0.0), self._reactor)
        d.addBoth(_then(udp_port.stopListening))
        return d

    def _tcp(self, query: dns.message.Message, server: tuple[str, int],
             timeout: float) -> Deferred:
        host, port = server
        exchange = _TCPExchange(query)
        factory = _TCPExchangeFactory(exchange)
        connector = self._reactor.connectTCP(host, port, factory, timeout=max(timeout, 0.001))
        d = exchange.result
        d.addTimeout(max(timeout, 0.0), self._reactor)
        d.addBoth(_then(connector.disconnect))
        return d


def _where(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _qname(query: dns.message.Message) -> str:
    return query.question[0].name.to_text(omit_final_dot=True).lower()


def _then(action):
    """addBoth helper: run a clean-up action and pass the result on unchanged."""
    def run(result):
        action()
        return result
    return run


# Marker result of a UDP exchange whose reply had TC set.
_TRUNCATED = object()


class _Flight:
    """One lookup on the wire and everyone waiting for it.

    Each waiter gets its own Deferred; cancelling it detaches that waiter only, and the lookup
    itself is cancelled when the last waiter leaves.
    """

    def __init__(self, op: Deferred) -> None:
        self.op = op
        self.waiters: list[Deferred] = []
        self.result: Any = _PENDING

    def start(self) -> None:
        self.op.addBoth(self._done)

    def waiter(self) -> Deferred:
        if self.result is not _PENDING:
            return defer.fail(self.result) if isinstance(self.result, Failure) \
                else defer.succeed(self.result)
        d = Deferred(self._leave)
        self.waiters.append(d)
        return d

    def _leave(self, d: Deferred) -> None:
        if d in self.waiters:
            self.waiters.remove(d)
        if not self.waiters and self.result is _PENDING:
            self.op.cancel()

    def _done(self, result) -> None:
        self.result = result
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)
        return None     # the failure, if any, went to the waiters


_PENDING = object()


class _UDPExchange(protocol.DatagramProtocol):
    """One query over a connected UDP socket: the kernel passes only the server's datagrams,
    and an ICMP port unreachable ends the exchange at once instead of at the timeout."""

    def __init__(self, query: dns.message.Message, server: tuple[str, int]) -> None:
        self.query = query
        self.server = server
        self.ignored = 0
        self.result: Deferred = Deferred()

    def startProtocol(self) -> None:
        try:
            self.transport.connect(*self.server)
            self.transport.write(self.query.to_wire())
        except OSError as e:    # network unreachable and the like
            self._finish(DNSTemporaryError(_qname(self.query), f"send failed: {e.strerror or e}"))

    def datagramReceived(self, data: bytes, addr) -> None:
        if self.result.called:
            return
        if is_truncated_reply(data, self.query):
            self._finish(_TRUNCATED)
            return
        reply = parse_reply(data, self.query)
        if reply is None:
            self.ignored += 1
            if self.ignored >= MAX_IGNORED_DATAGRAMS:
                self._finish(DNSTemporaryError(_qname(self.query), "only garbage replies"))
            return
        self._finish(reply)

    def connectionRefused(self) -> None:
        self._finish(DNSTemporaryError(_qname(self.query), "server unreachable"))

    def stopProtocol(self) -> None:
        # Twisted's epoll reactor reports the ICMP error of a connected UDP socket (EPOLLERR
        # without EPOLLIN) by closing the port rather than through connectionRefused.
        self._finish(DNSTemporaryError(_qname(self.query), "server unreachable"))

    def _finish(self, outcome) -> None:
        if self.result.called:
            return
        if isinstance(outcome, Exception):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)


class _TCPExchange(protocol.Protocol):
    """One query over TCP (RFC 1035 section 4.2.2: two-octet length prefix)."""

    def __init__(self, query: dns.message.Message) -> None:
        self.query = query
        self.buffer = b""
        self.result: Deferred = Deferred()

    def connectionMade(self) -> None:
        wire = self.query.to_wire()
        self.transport.write(struct.pack("!H", len(wire)) + wire)

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self.buffer += data
        if len(self.buffer) < 2:
            return
        (length,) = struct.unpack("!H", self.buffer[:2])
        if len(self.buffer) < 2 + length:
            return
        reply = parse_reply(self.buffer[2:2 + length], self.query)
        if reply is None:
            self.fail("unusable TCP reply")
        else:
            self.result.callback(reply)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.fail("TCP connection closed before the reply")

    def fail(self, why: str) -> None:
        if not self.result.called:
            self.result.errback(DNSTemporaryError(_qname(self.query), why))


class _TCPExchangeFactory(protocol.ClientFactory):
    def __init__(self, exchange: _TCPExchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr):
        return self.exchange

    def clientConnectionFailed(self, connector, reason) -> None:
        self.exchange.fail(f"TCP connect failed: {reason.getErrorMessage()}")


# --- wiring into the service tree ---------------------------------------------------------------

def attach(app, parent) -> None:
    """make_service component: app.resolver from settings.dns (resolv.conf when empty)."""
    app.resolver = Resolver(app.reactor, app.settings.dns.nameservers)
    app.reload_hooks.append(app.resolver.reload)
