"""Fakes of mailappliance.mailauth.service's IVerifier and ISigner, for SMTP adapter tests.

    verifier = FakeVerifier(spf=SPFResult("fail", "mailfrom", "x.test", "a@x.test"),
                            spf_mode="enforce", action="reject")
    signer = FakeSigner(b"DKIM-Signature: fake\\r\\n")

Each records its calls; Deferreds fire at once unless `hold=True` (then the test fires
`pending` itself). Both pass zope.interface.verify.verifyObject.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from mailappliance.mailauth.dmarc import DMARCResult
from mailappliance.mailauth.results import decide, spf_refusal
from mailappliance.mailauth.service import ISigner, IVerifier
from mailappliance.mailauth.spf import SPFResult
from mailappliance.reencode import fit_lines


@implementer(IVerifier)
class FakeVerifier:
    active = True

    def __init__(self, spf: SPFResult | None = None, *, spf_mode: str = "tag",
                 action: str = "accept", hostname: str = "mx.test", hold: bool = False) -> None:
        self.spf = spf
        self.spf_mode = spf_mode
        self.action = action
        self.hostname = hostname
        self.hold = hold
        self.spf_calls: list[tuple[str, str, str]] = []
        self.messages: list[bytes] = []
        self.pending: list[defer.Deferred] = []

    def _answer(self, value):
        if not self.hold:
            return defer.succeed(value)
        d = defer.Deferred()
        d.value = value
        self.pending.append(d)
        return d

    def check_spf(self, client_ip, helo, mail_from):
        self.spf_calls.append((client_ip, helo, mail_from))
        return self._answer(self.spf)

    def spf_refusal(self, result, client_ip):
        return None if result is None else spf_refusal(result, self.spf_mode, client_ip)

    def check_message(self, message, spf_result):
        self.messages.append(message)
        if self.action == "fail":            # a check that breaks: its Deferred fails
            return defer.fail(RuntimeError("verifier broke"))
        disposition = {"accept": "none"}.get(self.action, self.action)
        dmarc = DMARCResult("fail" if self.action != "accept" else "pass", "example.test",
                            disposition, disposition)
        return self._answer(decide(self.hostname, spf_result, [], dmarc, "enforce"))


@implementer(ISigner)
class FakeSigner:
    def __init__(self, fields: bytes = b"", hold: bool = False) -> None:
        self.fields = fields
        self.hold = hold
        self.calls: list[tuple[bytes, str]] = []
        self.pending: list[defer.Deferred] = []

    def maybe_keys(self):
        return True

    def sign(self, message, mail_from, from_domain=None, linesep=None):
        self.calls.append((message, mail_from))
        return self._answer(self.fields)

    def fit_and_sign(self, message, mail_from, linesep=None):
        """The real re-encoding (a pure function), the fake fields."""
        fitted = fit_lines(message)
        self.calls.append((fitted, mail_from))
        return self._answer((self.fields, fitted))

    def _answer(self, value):
        if not self.hold:
            return defer.succeed(value)
        d = defer.Deferred()
        d.value = value
        self.pending.append(d)
        return d
