"""FakeResolver: an IResolver answering from zone data in memory, for unit and adapter tests.

    resolver = FakeResolver({"example.test": {"@": [["MX", "10 mx1"]], "mx1": [["A", "127.0.0.1"]]}})
    resolver.fail("bl.test", "servfail")      # every name under bl.test: DNSTemporaryError
    resolver.fail("slow.test", "hang")        # never answers; cancelling the Deferred ends it
    verifyObject(IResolver, resolver)

Answers come from the same zone model as the test DNS server (mailappliance.testing.zones), and
mx_hosts()/addresses() are the real resolver's code (mailappliance.dns.ResolverBase), so a test
written against the fake means the same as one against the server. Deferreds fire at once,
except in "hang" mode. Every query is recorded in `queries`.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
from twisted.internet import defer
from zope.interface import implementer

from mailappliance.dns import (Answer, DNSPermanentError, DNSTemporaryError, IResolver,
                               ResolverBase, normalize_name, rdtype_of)
from mailappliance.testing.zones import Record, ZoneSet, txt_chunks

FAILURES = ("servfail", "refused", "timeout", "hang")


def to_rdata(r: Record) -> dns.rdata.Rdata:
    rdtype = dns.rdatatype.from_text(r.rdtype)
    if r.rdtype == "TXT":
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, rdtype, txt_chunks(r.value))
    text = r.value
    if r.rdtype in ("CNAME", "NS", "PTR"):
        text = text + "." if text != "." else text
    elif r.rdtype == "MX":
        pref, host = text.split(" ", 1)
        text = f"{pref} {host}." if host != "." else f"{pref} ."
    elif r.rdtype == "SOA":
        m, rn, *rest = text.split()
        text = " ".join([m + ".", rn + ".", *rest])
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


@implementer(IResolver)
class FakeResolver(ResolverBase):
    def __init__(self, zones: Mapping[str, Mapping[str, Any]] | None = None, *,
                 rng: random.Random | None = None) -> None:
        self.zones = ZoneSet(zones or {})
        self.rng = rng or random.Random(0)
        self.failures: dict[str, str] = {}
        self.queries: list[tuple[str, str]] = []
        self.hanging: list[defer.Deferred] = []

    def fail(self, suffix: str, how: str) -> None:
        """Make every name at or under `suffix` fail: servfail, refused, timeout or hang."""
        if how not in FAILURES:
            raise ValueError(f"how must be one of {FAILURES}")
        self.failures[suffix.lower().rstrip(".")] = how

    def heal(self, suffix: str) -> None:
        self.failures.pop(suffix.lower().rstrip("."), None)

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        return sum(1 for n, t in self.queries
                   if (name is None or n == name.lower().rstrip("."))
                   and (rdtype is None or t == rdtype.upper()))

    def _failure_for(self, name: str) -> str | None:
        best = None
        for suffix, how in self.failures.items():
            if name == suffix or name.endswith("." + suffix):
                if best is None or len(suffix) > len(best[0]):
                    best = (suffix, how)
        return best[1] if best else None

    def query(self, name: str, rdtype: int | str, timeout: float | None = None):
        try:
            qname = normalize_name(name)
            qtype = rdtype_of(rdtype)
        except ValueError as e:
            return defer.fail(DNSPermanentError(str(name), str(e)))
        type_text = dns.rdatatype.to_text(qtype)
        self.queries.append((qname, type_text))
        how = self._failure_for(qname)
        if how == "hang":
            d: defer.Deferred = defer.Deferred()
            self.hanging.append(d)
            return d
        if how is not None:
            return defer.fail(DNSTemporaryError(qname, how.upper() if how != "timeout"
                                                else "timeout"))
        result = self.zones.lookup(qname, type_text)
        if result.rcode == "REFUSED":
            return defer.fail(DNSTemporaryError(qname, "REFUSED"))
        final = tuple(r for r in result.answer if r.rdtype == type_text)
        if final:
            ttl = min(r.ttl for r in result.answer)
            canonical = final[0].owner
        else:
            soa = result.authority[0] if result.authority else None
            ttl = min(soa.ttl, int(soa.value.split()[-1])) if soa else 0
            canonical = result.answer[-1].value if result.answer else qname
        rcode = dns.rcode.NXDOMAIN if result.rcode == "NXDOMAIN" else dns.rcode.NOERROR
        return defer.succeed(Answer(name=qname, rdtype=qtype, rcode=rcode,
                                    records=tuple(to_rdata(r) for r in final), ttl=ttl,
                                    canonical_name=canonical))
