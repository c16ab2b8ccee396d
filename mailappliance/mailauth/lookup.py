"""What the pure checks ask of DNS, and what they get back.

The SPF, DKIM-key and DMARC cores are generators: they `yield Lookup(name, rdtype)` and are
sent a `DNSResult`, so they never touch a socket. mailappliance/mailauth/service.py feeds them
from the product's asynchronous resolver (mailappliance.dns, which caches answers for their
TTLs); tests feed them from mailappliance.testing.resolver.FakeResolver or a dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

OK, NXDOMAIN, TEMPERROR = "ok", "nxdomain", "temperror"


@dataclass(frozen=True)
class Lookup:
    name: str            # lower case, no trailing dot
    rdtype: str          # "TXT", "A", "AAAA", "MX", "PTR"


@dataclass(frozen=True)
class DNSResult:
    """status: ok (values may be empty: NODATA), nxdomain, or temperror (timeout, SERVFAIL...).

    values: TXT -> the texts (each record's strings joined); A/AAAA -> address strings;
    MX -> (preference, host) pairs; PTR -> host names (lower case, no trailing dot).
    """

    status: str
    values: tuple[Any, ...] = ()
    reason: str = ""

    @property
    def void(self) -> bool:
        """RFC 7208 section 4.6.4: NXDOMAIN, or NOERROR with no answer."""
        return self.status == NXDOMAIN or (self.status == OK and not self.values)


# A check: yields Lookups, is sent DNSResults, returns its result.
Check = Generator[Lookup, DNSResult, Any]


def run_sync(check: Check, answer) -> Any:
    """Drive a check with a blocking `answer(Lookup) -> DNSResult` (tests, tools)."""
    try:
        lookup = next(check)
        while True:
            lookup = check.send(answer(lookup))
    except StopIteration as stop:
        return stop.value
