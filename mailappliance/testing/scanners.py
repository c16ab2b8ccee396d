"""Fake scanners for mailappliance.scan, verified against IVirusScanner / ISpamScorer.

They keep the real clients' contract: Deferreds never fail, a scanner that does not answer
answers ScanFailure at `timeout` on the injected clock (twisted.internet.task.Clock in tests),
cancelling a pending call cancels it. `mode` switches behaviour between calls:

    "up"       answer from the patterns (FakeVirusScanner: first pattern found names the virus;
               FakeSpamScorer: the score is the sum of the rules whose pattern occurs)
    "down"     ScanFailure at once, as a refused connection
    "hang"     no answer until the timeout, then ScanFailure
    "limit"    (virus scanner) ScanFailure that is not an outage: clamd's StreamMaxLength
"""

from __future__ import annotations

from typing import Mapping

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailappliance.scan.clamd import SIZE_LIMIT_DETAIL
from mailappliance.scan.interfaces import (
    ISpamScorer, IVirusScanner, ScanEnvelope, ScanFailure, SpamReport, VirusReport, as_chunks)

# The EICAR anti-virus test file (eicar.org): 68 bytes every virus scanner reports.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# A token our test spam rules look for (in the fake and in the test rspamd's Lua rule).
SPAM_TOKEN = b"MAILAPPLIANCE-TEST-SPAM-7c1e"


class _Fake:
    name = "fake"

    def __init__(self, clock, timeout: float) -> None:
        self.clock = clock
        self.timeout = float(timeout)
        self.mode = "up"
        self.calls: list[bytes] = []
        self.pings = 0

    def _failure_or_none(self):
        if self.mode == "down":
            return defer.succeed(ScanFailure(f"cannot connect to {self.name}:"
                                             f" Connection refused"))
        if self.mode == "hang":
            if self.clock is None:
                raise RuntimeError("mode 'hang' needs a clock")
            d: Deferred = Deferred(lambda d: timer.cancel())
            timer = self.clock.callLater(self.timeout, d.callback,
                                         ScanFailure(f"no answer within {self.timeout:g} s"))
            return d
        return None

    def ping(self) -> Deferred:
        self.pings += 1
        pending = self._failure_or_none()
        return pending if pending is not None else defer.succeed(None)


@implementer(IVirusScanner)
class FakeVirusScanner(_Fake):
    name = "clamd"

    def __init__(self, signatures: Mapping[bytes, str] | None = None, *, clock=None,
                 timeout: float = 30.0) -> None:
        super().__init__(clock, timeout)
        self.signatures = dict(signatures if signatures is not None
                               else {EICAR: "Eicar-Test-Signature"})

    def scan(self, message) -> Deferred:
        data = b"".join(bytes(c) for c in as_chunks(message))
        self.calls.append(data)
        pending = self._failure_or_none()
        if pending is not None:
            return pending
        if self.mode == "limit":
            return defer.succeed(ScanFailure(SIZE_LIMIT_DETAIL, outage=False))
        for pattern, name in self.signatures.items():
            if pattern in data:
                return defer.succeed(VirusReport(name))
        return defer.succeed(VirusReport(None))


@implementer(ISpamScorer)
class FakeSpamScorer(_Fake):
    name = "rspamd"

    def __init__(self, rules: Mapping[bytes, tuple[str, float]] | None = None, *, clock=None,
                 timeout: float = 30.0) -> None:
        super().__init__(clock, timeout)
        self.rules = dict(rules if rules is not None
                          else {SPAM_TOKEN: ("MAILAPPLIANCE_TEST_SPAM", 20.0)})
        self.envelopes: list[ScanEnvelope] = []

    def score(self, message, envelope: ScanEnvelope) -> Deferred:
        data = b"".join(bytes(c) for c in as_chunks(message))
        self.calls.append(data)
        self.envelopes.append(envelope)
        pending = self._failure_or_none()
        if pending is not None:
            return pending
        hits = [(name, score) for pattern, (name, score) in self.rules.items() if pattern in data]
        return defer.succeed(SpamReport(sum(s for _, s in hits),
                                        tuple(sorted(n for n, _ in hits))))
