"""DNS: a small asynchronous stub resolver, dnspython as the codec, Twisted UDP/TCP as transport.

Two halves in one file, so the path of one query reads top to bottom:

- the pure part (no sockets, no reactor, no clock reads): resolv.conf parsing, query building,
  reply matching, answer extraction with negative-TTL computation, the TTL cache, and the MX
  ordering rules of RFC 5321 section 5.1 and RFC 7505 (null MX). dnspython is the codec; the
  two reply shapes of nearly every DNSBL lookup also have a hand decoder (`fast_answer`, about
  ten times cheaper, checked against dnspython by a property test), because a DNSBL lookup
  runs for every SMTP connection;
- the adapter: `Resolver`, which sends each query over a connected UDP socket (random source
  port, reused for at most 100 clean queries: `_UDPSocketPool`), falls back to TCP when the
  answer is truncated, retries the next nameserver on timeout, SERVFAIL or REFUSED, and never
  blocks the reactor. Time comes from the injected
  reactor (`callLater`, `seconds`), so tests drive timeouts with `twisted.internet.task.Clock`.

Errors: `DNSTemporaryError` (SERVFAIL, REFUSED, timeout, unreachable server, garbage) and
`DNSPermanentError` (NXDOMAIN for MX/address lookups, null MX, no address at all). `query()`
itself returns NXDOMAIN and NODATA as answers, because a DNSBL needs them as "not listed".

The cache holds NOERROR and NXDOMAIN answers for their TTL (negative answers for the SOA
minimum, RFC 2308), bounded in entries and in lifetime; concurrent identical queries share one
packet on the wire, so a flood of connections from one address costs one lookup.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, NamedTuple, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
from twisted.internet import defer, protocol
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
# RFC 1034 sets no bound on CNAME chains; dnspython follows 16, BIND 16 as well.
MAX_CNAME_CHAIN = 16
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


# Host names in the LDH form of RFC 1123 section 2.1 (what DNSBL queries and nearly all MX
# lookups are) skip dnspython's general name parser, which costs about 7 us per call.
_LDH_NAME = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                       r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
MAX_NAME_TEXT = 253     # RFC 1035 section 3.1: 255 octets on the wire


def normalize_name(name: str) -> str:
    """Lower case, no trailing dot; raises ValueError for a name DNS cannot carry."""
    plain = name.lower()
    if plain.endswith("."):
        plain = plain[:-1]
    if len(plain) <= MAX_NAME_TEXT and _LDH_NAME.fullmatch(plain):
        return plain
    try:
        n = dns.name.from_text(name.rstrip(".") + ".") if name not in ("", ".") else dns.name.root
    except (dns.exception.DNSException, UnicodeError) as e:
        raise ValueError(f"bad DNS name {name!r}: {e}") from None
    return n.to_text(omit_final_dot=True).lower() if n != dns.name.root else "."


_RDTYPES: dict[str, int] = {}


def rdtype_of(rdtype: int | str) -> int:
    if isinstance(rdtype, str):
        known = _RDTYPES.get(rdtype)
        if known is None:
            known = int(dns.rdatatype.from_text(rdtype.upper()))
            if len(_RDTYPES) < 64:
                _RDTYPES[rdtype] = known
        return known
    return int(rdtype)


class _QueryIds:
    """Unpredictable 16-bit query ids (RFC 5452 section 9.2) from the kernel's CSPRNG, read
    4 KiB at a time: one getrandom() per 2,048 queries instead of one per query (a system
    call on the reactor thread gives up the GIL, and under load getting it back is the cost)."""

    def __init__(self) -> None:
        self._ids: list[int] = []

    def next(self) -> int:
        ids = self._ids
        if not ids:
            raw = os.urandom(4096)
            ids.extend(struct.unpack(f"!{len(raw) // 2}H", raw))
        return ids.pop()


_query_ids = _QueryIds()


# RFC 1035 section 4.1.1: header flags and the OPT pseudo-record type of RFC 6891.
_FLAG_QR, _FLAG_TC, _FLAG_RD, _OPCODE_MASK = 0x8000, 0x0200, 0x0100, 0x7800
_TYPE_OPT, _CLASS_IN = 41, 1
_HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
# OPT: root owner, type 41, class = UDP payload size, TTL 0 (version 0, no DO), no options.
_OPT_RECORD = b"\x00" + struct.pack("!HHIH", _TYPE_OPT, EDNS_PAYLOAD, 0, 0)


class Query(NamedTuple):
    """One question as sent: its id, and the exact question section to match replies with.

    A named tuple rather than a frozen dataclass: one is built per DNSBL lookup of every
    connection, and a frozen dataclass's __init__ sets each field through object.__setattr__.
    """

    name: str
    rdtype: int
    qid: int
    edns: bool
    wire: bytes
    question: bytes          # QNAME QTYPE QCLASS as on the wire


def make_query(name: str, rdtype: int, use_edns: bool = True, qid: int | None = None) -> Query:
    """A recursive query with an unpredictable 16-bit id (RFC 5452 section 9.2).

    dnspython encodes the name; the fixed 12-octet header, the question's type and class and
    the OPT record are packed here, which costs a tenth of building a dnspython message (this
    runs for every DNSBL lookup of every connection).
    """
    qid = _query_ids.next() if qid is None else qid
    if len(name) <= MAX_NAME_TEXT and _LDH_NAME.fullmatch(name):
        qname = b"".join([bytes((len(label),)) + label
                          for label in name.encode("ascii").split(b".")]) + b"\x00"
    else:
        qname = (dns.name.from_text(name) if name != "." else dns.name.root).to_wire()
    question = qname + _TYPE_CLASS.pack(rdtype, _CLASS_IN)
    if use_edns:
        return Query(name, rdtype, qid, True,
                     _HEADER.pack(qid, _FLAG_RD, 1, 0, 0, 1) + question + _OPT_RECORD, question)
    return Query(name, rdtype, qid, False, _HEADER.pack(qid, _FLAG_RD, 1, 0, 0, 0) + question,
                 question)


def _answers(wire: bytes, query: Query) -> bool:
    """Is `wire` a reply to `query`: same id, QR set, opcode QUERY, the same question?

    Names compare case-insensitively (RFC 4343), so a server that echoes 0x20-mixed case passes.
    """
    if len(wire) < 12 + len(query.question):
        return False
    qid, flags, qdcount = struct.unpack("!HHH", wire[:6])
    if qid != query.qid or not flags & _FLAG_QR or flags & _OPCODE_MASK or qdcount != 1:
        return False
    return wire[12:12 + len(query.question)].lower() == query.question.lower()


def is_truncated_reply(wire: bytes, query: Query) -> bool:
    """A reply to `query` with TC set: ask again over TCP (RFC 1035 4.2.1, RFC 7766).

    Only the header and question are read: a truncated body may not parse at all.
    """
    return len(wire) >= 4 and bool(struct.unpack("!H", wire[2:4])[0] & _FLAG_TC) \
        and _answers(wire, query)


def parse_reply(wire: bytes, query: Query) -> dns.message.Message | None:
    """The reply if `wire` parses and answers `query`; else None (ignored as stale or forged)."""
    if not _answers(wire, query):
        return None
    try:
        return dns.message.from_wire(wire, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, struct.error, UnicodeError):
        return None


# --- the fast path: the two reply shapes of nearly all DNSBL traffic ---------------------------
#
# dnspython decodes a reply in about 100 us; a DNSBL lookup is one of two shapes, "NXDOMAIN or
# NODATA with the zone's SOA" and "NOERROR with A records for the name asked", and reading those
# by hand costs a tenth. Anything else (CNAMEs, other types, other sections, an extended rcode,
# unusual compression) returns None and goes to dnspython. tests/unit/test_dns_core.py checks
# on generated replies that both paths agree.

_TYPE_A, _TYPE_AAAA, _TYPE_SOA = 1, 28, 6
_MAX_POINTERS = 16     # compression pointers followed in one name (loops end here)


def _skip_name(wire: bytes, pos: int) -> int:
    """Offset after the name at `pos` (labels, ending in a root label or a pointer)."""
    while True:
        length = wire[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length & 0xC0:
            raise ValueError("bad label type")
        pos += 1 + length


def _read_name(wire: bytes, pos: int) -> bytes:
    """The name at `pos` in wire format without compression, lower case."""
    out = []
    for _ in range(_MAX_POINTERS):
        while True:
            length = wire[pos]
            if length == 0:
                out.append(b"\x00")
                return b"".join(out).lower()
            if length & 0xC0 == 0xC0:
                pos = ((length & 0x3F) << 8) | wire[pos + 1]
                break
            if length & 0xC0:
                raise ValueError("bad label type")
            out.append(wire[pos:pos + 1 + length])
            pos += 1 + length
    raise ValueError("compression loop")


def _is_subdomain(name: bytes, parent: bytes) -> bool:
    """Both in uncompressed wire form: is `name` at or below `parent` (label boundaries)?"""
    if name == parent or parent == b"\x00":
        return True
    if not name.endswith(parent):
        return False
    pos = 0
    while pos < len(name) - len(parent):
        pos += 1 + name[pos]
    return pos == len(name) - len(parent)


def fast_answer(name: str, rdtype: int, query: Query, wire: bytes) -> Answer | None:
    """Decode a DNSBL-shaped reply to `query` by hand, or None to leave it to dnspython.

    `wire` must already match the query (see _answers). Raises DNSTemporaryError for an rcode
    other than NOERROR/NXDOMAIN, like answer_from_reply.
    """
    if rdtype not in (_TYPE_A, _TYPE_AAAA):
        return None
    try:
        flags, _qd, an, ns, ar = struct.unpack("!HHHHH", wire[2:12])
        rcode = flags & 0xF
        pos = 12 + len(query.question)
        qname = query.question[:-4].lower()
        records: list[dns.rdata.Rdata] = []
        ttl = MAX_CACHE_TTL
        for _ in range(an):
            if wire[pos:pos + 2] == b"\xc0\x0c":           # pointer to the question's name
                pos += 2
            else:
                return None
            rtype, rclass, rttl, rdlen = struct.unpack("!HHIH", wire[pos:pos + 10])
            pos += 10
            if rtype != rdtype or rclass != _CLASS_IN or rdlen != (4 if rtype == _TYPE_A
                                                                    else 16):
                return None
            if pos + rdlen > len(wire):
                return None
            records.append(_address_rdata(rtype, wire[pos:pos + rdlen]))
            ttl = min(ttl, rttl)
            pos += rdlen
        negative: int | None = None
        for _ in range(ns):
            owner = _read_name(wire, pos)
            pos = _skip_name(wire, pos)
            rtype, rclass, rttl, rdlen = struct.unpack("!HHIH", wire[pos:pos + 10])
            pos += 10
            end = pos + rdlen
            if rtype != _TYPE_SOA or rclass != _CLASS_IN or records or end > len(wire):
                return None
            inner = _skip_name(wire, _skip_name(wire, pos))   # MNAME, RNAME
            if inner + 20 != end:
                return None
            minimum = struct.unpack("!I", wire[end - 4:end])[0]
            if negative is None and _is_subdomain(qname, owner):
                negative = min(rttl, minimum)      # the first fitting SOA, as dnspython's path
            pos = end
        for _ in range(ar):
            if wire[pos] != 0:                               # only OPT, owner root
                return None
            rtype, _cls, rttl, rdlen = struct.unpack("!HHIH", wire[pos + 1:pos + 11])
            if rtype != _TYPE_OPT or rttl >> 24:              # extended rcode bits set
                return None
            pos += 11 + rdlen
        if pos > len(wire):
            return None
    except (IndexError, struct.error, ValueError):
        return None
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise DNSTemporaryError(name, dns.rcode.to_text(rcode))
    if records and rcode == dns.rcode.NXDOMAIN:
        raise DNSTemporaryError(name, "NXDOMAIN with an answer")
    if not records:
        ttl = min(ttl, negative or 0)
    return Answer(name=name, rdtype=rdtype, rcode=dns.rcode.Rcode(rcode),
                  records=tuple(records), ttl=ttl, canonical_name=name)


def _address_rdata(rtype: int, raw: bytes) -> dns.rdata.Rdata:
    if rtype == _TYPE_A:
        return dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, socket.inet_ntop(
            socket.AF_INET, raw))
    return dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, socket.inet_ntop(
        socket.AF_INET6, raw))


def decode_reply(name: str, rdtype: int, query: Query, wire: bytes) -> Answer:
    """The Answer in a reply that matches `query`: the fast path, else dnspython."""
    answer = fast_answer(name, rdtype, query, wire)
    if answer is not None:
        return answer
    try:
        reply = dns.message.from_wire(wire, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, struct.error, UnicodeError):
        raise DNSTemporaryError(name, "unparsable reply") from None
    return answer_from_reply(name, rdtype, reply)


def reply_rcode(wire: bytes) -> int:
    """The rcode in the header (the 4 low bits; enough to spot FORMERR)."""
    return struct.unpack("!H", wire[2:4])[0] & 0xF


def answer_from_reply(name: str, rdtype: int, reply: dns.message.Message) -> Answer:
    """Extract the answer for (name, rdtype), following CNAMEs inside the reply.

    The TTL is the smallest of the records and CNAMEs used; for a negative answer it is
    min(SOA TTL, SOA minimum) of the SOA in the authority section (RFC 2308 section 5), and 0
    (not cached) without one, as RFC 2308 section 5 says such answers SHOULD NOT be cached.
    Raises DNSTemporaryError for an rcode other than NOERROR/NXDOMAIN or an inconsistent reply.
    """
    rcode = reply.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise DNSTemporaryError(name, dns.rcode.to_text(rcode))
    if len(reply.question) != 1:
        raise DNSTemporaryError(name, "reply without its question")
    qname = reply.question[0].name
    ttl = MAX_CACHE_TTL
    found = None
    for _ in range(MAX_CNAME_CHAIN + 1):
        cname = None
        for rrset in reply.answer:
            if rrset.rdclass != dns.rdataclass.IN or rrset.name != qname:
                continue
            if rrset.rdtype == rdtype:
                found = rrset
                break
            if rrset.rdtype == dns.rdatatype.CNAME and rdtype != dns.rdatatype.CNAME:
                cname = rrset
        if found is not None:
            ttl = min(ttl, found.ttl)
            break
        if cname is None:
            break
        ttl = min(ttl, cname.ttl)
        qname = cname[0].target
    else:
        raise DNSTemporaryError(name, "CNAME chain too long")
    if found is not None and rcode == dns.rcode.NXDOMAIN:
        raise DNSTemporaryError(name, "NXDOMAIN with an answer")
    if found is None:
        negative = 0
        for rrset in reply.authority:
            if rrset.rdtype == dns.rdatatype.SOA and qname.is_subdomain(rrset.name):
                negative = min(rrset.ttl, rrset[0].minimum)
                break
        ttl = min(ttl, negative)
    return Answer(name=name, rdtype=rdtype, rcode=rcode,
                  records=tuple(found) if found is not None else (), ttl=max(0, int(ttl)),
                  canonical_name=qname.to_text(omit_final_dot=True).lower())


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
    The reactor provides addReader/removeReader, connectTCP, callLater and seconds.
    """

    log = Logger()

    def __init__(self, reactor, nameservers: Sequence[tuple[str, int]] = (),
                 timeout: float = DEFAULT_TIMEOUT, *, attempt_timeout: float | None = None,
                 attempts: int | None = None, resolv_conf: str = RESOLV_CONF,
                 cache_entries: int = DEFAULT_CACHE_ENTRIES, rng: random.Random | None = None,
                 udp_opener=None) -> None:
        self._reactor = reactor
        # (server, exchange) -> a socket with send() and close(); tests inject a double.
        self._open_udp = udp_opener or _UDPSocketPool(reactor)
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
            if isinstance(self._open_udp, _UDPSocketPool):
                self._open_udp.close()          # idle sockets are connected to the old servers

    def close(self) -> None:
        """Close the pooled idle UDP sockets (at shutdown; queries in flight close theirs)."""
        if isinstance(self._open_udp, _UDPSocketPool):
            self._open_udp.close()

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
        op = _Lookup(self, qname, qtype, self.timeout if timeout is None else timeout).start()
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

    def _udp(self, query: Query, server: tuple[str, int], timeout: float) -> Deferred:
        """Send `query` over a fresh connected UDP socket: Deferred[reply wire | _TRUNCATED]."""
        exchange = _UDPExchange(query, self._reactor)
        try:
            sock = self._open_udp(server, exchange)
        except OSError as e:
            return defer.fail(DNSTemporaryError(query.name, f"no UDP socket: {e.strerror or e}"))
        self.stats["sent_udp"] += 1
        exchange.start(sock, timeout)
        return exchange.result

    def _tcp(self, query: Query, server: tuple[str, int],
             timeout: float) -> Deferred:
        host, port = server
        exchange = _TCPExchange(query)
        factory = _TCPExchangeFactory(exchange)
        self.stats["sent_tcp"] += 1
        connector = self._reactor.connectTCP(host, port, factory, timeout=max(timeout, 0.001))
        d = exchange.result
        d.addTimeout(max(timeout, 0.0), self._reactor)
        d.addBoth(_then(connector.disconnect))
        d.addErrback(_timeout_as_dns_error, query.name)
        return d


def _where(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


class _Lookup:
    """One query() on the wire: servers in turn, `attempts` rounds, all within `timeout`.

    Per try: UDP; TCP when the reply is truncated; once more without EDNS after FORMERR
    (RFC 6891 section 7). SERVFAIL, REFUSED, an unusable reply, a timeout or an unreachable
    server moves on to the next try. Written as explicit callbacks rather than a coroutine:
    this runs for every DNSBL lookup and the difference is measurable.
    """

    def __init__(self, resolver: "Resolver", name: str, rdtype: int, timeout: float) -> None:
        self.resolver = resolver
        self.name = name
        self.rdtype = rdtype
        self.deadline = resolver._reactor.seconds() + timeout
        self.tries = resolver._server_order() * resolver.attempts
        self.index = -1
        self.problems: list[str] = []
        self.current: Deferred | None = None
        self.cancelled = False
        self.result: Deferred = Deferred(self._cancel)

    def start(self) -> Deferred:
        self._next_try()
        return self.result

    def _remaining(self) -> float:
        return self.deadline - self.resolver._reactor.seconds()

    def _next_try(self) -> None:
        self.index += 1
        remaining = self._remaining()
        if self.index >= len(self.tries) or remaining <= 0:
            self.resolver.stats["failures"] += 1
            # The last few reasons are enough for a log line and a bounce.
            if not self.tries:
                self.problems.append("no nameserver configured")
            self.result.errback(DNSTemporaryError(
                self.name, "; ".join(self.problems[-3:]) or "timeout"))
            return
        self.try_deadline = self.resolver._reactor.seconds() + min(
            self.resolver.attempt_timeout, remaining)
        self._send(use_edns=True)

    def _send(self, use_edns: bool) -> None:
        query = make_query(self.name, self.rdtype, use_edns)
        server = self.tries[self.index]
        timeout = self.try_deadline - self.resolver._reactor.seconds()
        self.current = d = self.resolver._udp(query, server, timeout)
        d.addCallbacks(self._replied, self._failed, callbackArgs=(query, server))

    def _replied(self, wire, query: Query, server: tuple[str, int]) -> None:
        if self.cancelled:
            return
        if wire is _TRUNCATED:
            timeout = self.try_deadline - self.resolver._reactor.seconds()
            self.current = d = self.resolver._tcp(query, server, timeout)
            d.addCallbacks(self._replied, self._failed, callbackArgs=(query, server))
            return
        if query.edns and reply_rcode(wire) == dns.rcode.FORMERR:
            self._send(use_edns=False)     # an old server without EDNS0
            return
        try:
            answer = decode_reply(self.name, self.rdtype, query, wire)
        except DNSTemporaryError as e:
            self.problems.append(f"{e.reason} from {_where(server)}")
            self._next_try()
            return
        except Exception as e:      # a reply our decoders choke on: that server's try failed
            self.problems.append(f"unusable reply ({type(e).__name__}) from {_where(server)}")
            self._next_try()
            return
        self.result.callback(answer)

    def _failed(self, failure: Failure) -> None:
        if self.cancelled:
            return None
        server = self.tries[self.index]
        if failure.check(DNSTemporaryError):
            if failure.value.reason == "timeout":
                self.resolver.stats["timeouts"] += 1
            self.problems.append(f"{failure.value.reason} from {_where(server)}")
        else:   # a bug below us: counted as a failed try, never left unhandled
            self.problems.append(f"{failure.getErrorMessage()} from {_where(server)}")
        self._next_try()
        return None

    def _cancel(self, _d: Deferred) -> None:
        self.cancelled = True
        if self.current is not None and not self.current.called:
            self.current.cancel()


class _UDPExchange:
    """What one UDP query waits for: a matching reply, TC, garbage, an unreachable server or
    the timeout. Whatever comes first ends it, closes the socket and cancels the timer."""

    def __init__(self, query: Query, reactor) -> None:
        self.query = query
        self.reactor = reactor
        self.ignored = 0
        self.clean = False      # ended by its own reply, nothing else: the socket may be reused
        self.sock = None
        self.timer = None
        self.result: Deferred = Deferred(self._cancelled)

    @property
    def done(self) -> bool:
        return self.result.called

    def start(self, sock, timeout: float) -> None:
        self.sock = sock
        self.timer = self.reactor.callLater(max(timeout, 0.0), self._timed_out)
        try:
            sock.send(self.query.wire)
        except OSError as e:    # network unreachable, an ICMP error already pending, ...
            self.unreachable(f"send failed: {e.strerror or e}")

    def datagram(self, data: bytes) -> None:
        if self.result.called:
            return
        if not _answers(data, self.query):
            self.ignored += 1
            if self.ignored >= MAX_IGNORED_DATAGRAMS:
                self._finish(DNSTemporaryError(self.query.name, "only garbage replies"))
            return
        self.clean = self.ignored == 0
        self._finish(_TRUNCATED if is_truncated_reply(data, self.query) else data)

    def unreachable(self, why: str = "server unreachable") -> None:
        self._finish(DNSTemporaryError(self.query.name, why))

    def _timed_out(self) -> None:
        self.timer = None
        self._finish(DNSTemporaryError(self.query.name, "timeout"))

    def _cleanup(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _cancelled(self, _d: Deferred) -> None:
        self._cleanup()           # the Deferred then fails with CancelledError

    def _finish(self, outcome) -> None:
        if self.result.called:
            return
        self._cleanup()
        if isinstance(outcome, Exception):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)


def _timeout_as_dns_error(failure: Failure, name: str) -> None:
    failure.trap(defer.TimeoutError)
    raise DNSTemporaryError(name, "timeout")


class _ConnectedUDPSocket:
    """A connected UDP socket watched by the reactor (IReadDescriptor) while a query uses it.

    Connected, so the kernel delivers only the server's datagrams and reports its ICMP port
    unreachable as ECONNREFUSED; its source port is chosen at random by the kernel (RFC 5452
    section 9.2). A plain socket rather than reactor.listenUDP, whose port logs two lines per
    open and close: that would be two log lines per DNSBL lookup. `_UDPSocketPool` reuses it
    for a few queries to the same server (see there).
    """

    def __init__(self, reactor, server: tuple[str, int], exchange: _UDPExchange,
                 pool: "_UDPSocketPool | None" = None) -> None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self._reactor = reactor
        self.server = server
        self.exchange: _UDPExchange | None = exchange
        self.pool = pool
        self.uses = 1
        self.sock: socket.socket | None = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.connect(server)
        except OSError:
            self.sock.close()
            raise
        reactor.addReader(self)

    @classmethod
    def opener(cls, reactor):
        return lambda server, exchange: cls(reactor, server, exchange)

    def reuse(self, exchange: _UDPExchange) -> None:
        self.exchange = exchange
        self.uses += 1          # still watched by the reactor: no epoll_ctl per query

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def logPrefix(self) -> str:
        return "dns-udp"

    def send(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.send(data)

    def doRead(self) -> None:
        if self.sock is not None and self.exchange is None:
            self._idle_read()
            return
        for _ in range(MAX_IGNORED_DATAGRAMS):
            exchange = self.exchange
            if self.sock is None or exchange is None or exchange.done:
                return
            try:
                data = self.sock.recv(MAX_TCP_MESSAGE)
            except BlockingIOError:
                return
            except OSError as e:        # ECONNREFUSED: ICMP port unreachable from the server
                exchange.unreachable("server unreachable" if isinstance(
                    e, ConnectionRefusedError) else f"receive failed: {e.strerror or e}")
                return
            exchange.datagram(data)

    def _idle_read(self) -> None:
        """Something arrived while the socket sat idle in the pool: nothing should have (its
        last query ended with its own reply), so it is a late duplicate or a forgery. Drop it
        and retire the socket: the pool only lends out ports nothing is aimed at."""
        for _ in range(MAX_IGNORED_DATAGRAMS):
            try:
                self.sock.recv(MAX_TCP_MESSAGE)
            except OSError:          # drained (EAGAIN), or an ICMP error: retired either way
                break
        self.retire()

    def connectionLost(self, reason=None) -> None:
        # The epoll reactor reports a socket error without readable data (EPOLLERR) this way.
        if self.exchange is not None:
            self.exchange.unreachable()
        elif self.sock is not None:
            self.retire()

    def close(self) -> None:
        """The query is over: back to the pool when it ended cleanly, else really closed.

        A pooled socket stays registered with the reactor while idle: taking it off and on
        again costs two epoll_ctl calls per query on the reactor thread (each gives up the
        GIL), and staying watched lets `_idle_read` notice anything aimed at an idle port.
        """
        if self.sock is None:
            return
        exchange, self.exchange = self.exchange, None
        if (self.pool is not None and exchange is not None and exchange.clean
                and self.pool.give_back(self)):
            return
        self._reactor.removeReader(self)
        self.sock.close()
        self.sock = None

    def retire(self) -> None:
        """Close an idle pooled socket for good (and take it out of its pool)."""
        if self.pool is not None:
            self.pool.forget(self)
        if self.sock is not None:
            self._reactor.removeReader(self)
            self.sock.close()
            self.sock = None


class _UDPSocketPool:
    """Connected UDP sockets per nameserver, each reused for up to MAX_USES queries.

    A fresh socket per query costs socket(), connect() and close() on the reactor thread for
    every DNSBL lookup of every connection, and each system call gives up the GIL. So a socket
    whose query ended with its own reply (no timeout, no garbage, no error: nothing can still
    be on its way to it) goes back to an idle list, still watched by the reactor (anything that
    arrives while it is idle retires it), and the next query to that server takes it. Source
    ports stay random -- each socket's port is chosen by the kernel -- and each port carries
    at most MAX_USES queries, each with its own random id, one at a time; a pool of up to
    MAX_IDLE such ports per server is the design dnsmasq uses (its RANDOM_SOCKS, 64). A socket that ended in any other way is closed, never reused.
    """

    MAX_USES = 100
    MAX_IDLE = 64

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._idle: dict[tuple[str, int], list[_ConnectedUDPSocket]] = {}

    def __call__(self, server: tuple[str, int], exchange: _UDPExchange) -> _ConnectedUDPSocket:
        idle = self._idle.get(server)
        if idle:
            sock = idle.pop()
            sock.reuse(exchange)
            return sock
        return _ConnectedUDPSocket(self._reactor, server, exchange, self)

    def give_back(self, sock: _ConnectedUDPSocket) -> bool:
        if sock.uses >= self.MAX_USES:
            return False
        idle = self._idle.setdefault(sock.server, [])
        if len(idle) >= self.MAX_IDLE:
            return False
        idle.append(sock)
        return True

    def forget(self, sock: _ConnectedUDPSocket) -> None:
        idle = self._idle.get(sock.server)
        if idle and sock in idle:
            idle.remove(sock)

    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.retire()


class _TCPExchange(protocol.Protocol):
    """One query over TCP (RFC 1035 section 4.2.2: two-octet length prefix)."""

    def __init__(self, query: Query) -> None:
        self.query = query
        self.buffer = b""
        self.result: Deferred = Deferred()

    def connectionMade(self) -> None:
        wire = self.query.wire
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
        reply = self.buffer[2:2 + length]
        if not _answers(reply, self.query):
            self.fail("unusable TCP reply")
        else:
            self.result.callback(reply)
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.fail("TCP connection closed before the reply")

    def fail(self, why: str) -> None:
        if not self.result.called:
            self.result.errback(DNSTemporaryError(self.query.name, why))


class _TCPExchangeFactory(protocol.ClientFactory):
    noisy = False            # no "Starting factory" log line per TCP query

    def __init__(self, exchange: _TCPExchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr):
        return self.exchange

    def clientConnectionFailed(self, connector, reason) -> None:
        self.exchange.fail(f"TCP connect failed: {reason.getErrorMessage()}")


# --- wiring into the service tree ---------------------------------------------------------------

def build_resolver(settings, reactor) -> Resolver:
    """make_service's DNS part: the resolver for settings.dns (resolv.conf when empty); its
    idle sockets close after the reactor stops. make_service makes it follow reloads."""
    resolver = Resolver(reactor, settings.dns.nameservers)
    reactor.addSystemEventTrigger("after", "shutdown", resolver.close)
    return resolver
