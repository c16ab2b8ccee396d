"""The Twisted side of mail authentication: what the SMTP server and the injector call.

    verifier = Verifier(app.resolver, reactor, app.threadpool, hostname, spf="tag", dkim="tag",
                        dmarc="enforce")
    spf = yield verifier.check_spf(client_ip, helo, mail_from)      # at MAIL FROM
    refusal = verifier.spf_refusal(spf, client_ip)                    # Reply (550) or None
    verdict = yield verifier.check_message(message, spf)             # after the final dot
    verdict.action, verdict.reply, verdict.apply(message, linesep)   # accept/quarantine/reject

    signer = Signer(KeyRegistry(data, report), reactor, app.threadpool)
    fields = yield signer.sign(message, mail_from)                    # at injection: b"" or
                                                                      # DKIM-Signature fields

Every DNS question goes to the product's asynchronous resolver (`IResolver.query`, which
caches answers for their TTLs and shares identical questions in flight); the pure cores
(spf.py, dmarc.py, dkimverify.key_names) only say what to ask. Each check has an overall
deadline (RFC 7208 section 4.6.4: at least 20 seconds) after which the question in flight is
cancelled and every further one answered "temperror", so a silent DNS server costs a session
time but never a thread, and never blocks another session. CPU work -- hashing, RSA, Ed25519
-- runs in the thread pool, except for small messages (INLINE_BYTES), whose fraction of a
millisecond costs less on the reactor thread than the trip to the pool and back.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import dns.name
import dns.rdatatype
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from mailappliance.dns import Answer, DNSError, DNSTemporaryError
from mailappliance.enddata import Outcome, Transaction, accept, refuse
from mailappliance.mailauth import dkimverify, dmarc, spf
from mailappliance.mailauth.keys import KeyRegistry
from mailappliance.mailauth.lookup import NXDOMAIN, OK, TEMPERROR, Check, DNSResult, Lookup
from mailappliance.mailauth.message import address_domain, from_domains, split_message
from mailappliance.mailauth.results import (MODES_DKIM, MODES_DMARC, MODES_SPF, Verdict,
                                            decide, spf_refusal)
from mailappliance.mailauth.sign import sign_with_registry
from mailappliance.reencode import fit_lines

# RFC 7208 section 4.6.4: an SPF evaluation MAY be cut off after at least 20 seconds.
SPF_TIMEOUT = 20.0
# The same bound for the DNS of one message's DKIM keys and DMARC records, which run in
# parallel: the client is waiting for the reply to its final dot (RFC 5321 section 4.5.3.2.6
# gives it 10 minutes, so 20 s is well inside).
MESSAGE_DNS_TIMEOUT = 20.0
# Small messages are verified and signed on the reactor thread, larger ones in the thread pool.
# Verifying a 2 KiB message with one signature costs about 0.3 ms of CPU and signing it 0.1 ms
# (Ed25519) to 0.4 ms (RSA-2048), mostly Python holding the GIL: handing that to a pool
# thread and back costs more CPU than it saves the reactor (the two threads take turns at the
# GIL; benchmarks/mailauth_bench.py measured about 0.3 ms more per message). Up to 32 KiB
# the work stays under about 1 ms, no more than the reactor spends on the message anyway.
INLINE_BYTES = 32 * 1024
# Signatures verified inline at most: every further one may cost dkimpy's pure-Python RSA
# (about 1 ms) when it does not pass on the fast path, which a sender controls.
INLINE_SIGNATURES = 2


class IVerifier(Interface):
    """Checks of mail from the internet (not AUTH, RELAYCLIENT or roaming-grant clients)."""

    active = Attribute("False when every [verify] mode is off: nothing to check at all")

    def check_spf(client_ip, helo, mail_from):
        """Deferred[SPFResult | None] (None when [verify] spf and dmarc are both off). Never
        fails: DNS trouble is a temperror result."""

    def spf_refusal(result, client_ip):
        """Reply (550 5.7.23) to give MAIL FROM under spf = "enforce", else None."""

    def check_message(message, spf_result):
        """Deferred[Verdict] for the whole message (header and body, CRLF or LF lines).
        Never fails: DNS trouble is temperror, which never refuses."""


class ISigner(Interface):
    def maybe_keys():
        """False when there is surely no key to sign with (cheap: one stat)."""

    def sign(message, mail_from, from_domain=None, linesep=None):
        """Deferred[bytes]: DKIM-Signature fields to put on top of `message` (one per key of
        the signing domain), or b"" when no key applies."""

    def fit_and_sign(message, mail_from, linesep=None):
        """Deferred[(fields, message)]: `message` with no line over RFC 5321's limit
        (reencode.fit_lines; the same object when it had none) and the DKIM-Signature fields
        over that, so the bytes queued are the bytes every attempt sends and the signature
        covers them (docs/LIMITS.md, "Long lines")."""


# --- driving the pure checks with the resolver --------------------------------------------------

def to_result(answer: Answer) -> DNSResult:
    """The resolver's Answer as the cores see it."""
    if answer.nxdomain:
        return DNSResult(NXDOMAIN)
    rdtype = answer.rdtype
    if rdtype == dns.rdatatype.TXT:
        values: tuple[Any, ...] = tuple(answer.texts())
    elif rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        values = tuple(answer.addresses())
    elif rdtype == dns.rdatatype.MX:
        values = tuple((int(r.preference), "." if r.exchange == dns.name.root
                        else r.exchange.to_text(omit_final_dot=True).lower())
                       for r in answer.records if r.rdtype == dns.rdatatype.MX)
    elif rdtype == dns.rdatatype.PTR:
        values = tuple(r.target.to_text(omit_final_dot=True).lower()
                       for r in answer.records if r.rdtype == dns.rdatatype.PTR)
    else:
        values = tuple(answer.records)
    return DNSResult(OK, values)


class _Driver:
    """Runs one check generator against the resolver until it returns, within `deadline`.

    Answers that are already there (the resolver's cache) are fed in a loop, not by nested
    callbacks, so a long chain of cached lookups cannot grow the stack.
    """

    def __init__(self, check: Check, resolver, reactor, timeout: float) -> None:
        self.check = check
        self.resolver = resolver
        self.reactor = reactor
        self.deadline = reactor.seconds() + timeout
        self.result: Deferred = Deferred(lambda _d: self._cancel())
        self.current: Deferred | None = None
        self.timer = reactor.callLater(timeout, self._expired)
        self.expired = False
        self.queries = 0

    def start(self) -> Deferred:
        self._step(None, first=True)
        return self.result

    def _ask(self, lookup: Lookup) -> Deferred | DNSResult:
        remaining = self.deadline - self.reactor.seconds()
        if self.expired or remaining <= 0:
            return DNSResult(TEMPERROR, reason="timeout")
        self.queries += 1
        try:
            return self.resolver.query(lookup.name, lookup.rdtype, timeout=remaining)
        except Exception as e:       # a resolver that raises instead of failing its Deferred
            return DNSResult(TEMPERROR, reason=str(e))

    def _step(self, value: DNSResult | None, first: bool = False) -> None:
        while True:
            try:
                lookup = next(self.check) if first else self.check.send(value)
            except StopIteration as stop:
                self._finish(stop.value)
                return
            except Exception:
                self._finish(Failure())
                return
            first = False
            asked = self._ask(lookup)
            if isinstance(asked, DNSResult):
                value = asked
                continue
            # An answer that is there at once (the cache) is collected here, in this loop,
            # rather than by a nested _step call.
            box: list = []
            self.current = asked
            asked.addBoth(self._answered, box)
            if box:
                value = box[0]
                continue
            box.append(None)           # from now on, _answered resumes the check itself
            return

    def _answered(self, outcome, box: list) -> None:
        self.current = None
        value = self._convert(outcome)
        if not box:
            box.append(value)
            return
        if not self.result.called:
            self._step(value)

    @staticmethod
    def _convert(outcome) -> DNSResult:
        if isinstance(outcome, Answer):
            return to_result(outcome)
        if isinstance(outcome, Failure):
            if outcome.check(DNSTemporaryError):
                return DNSResult(TEMPERROR, reason=outcome.value.reason)
            if outcome.check(DNSError):              # a name DNS cannot carry
                return DNSResult(NXDOMAIN, reason=outcome.value.reason)
            if outcome.check(defer.CancelledError):
                return DNSResult(TEMPERROR, reason="timeout")
            return DNSResult(TEMPERROR, reason=outcome.getErrorMessage())
        return DNSResult(TEMPERROR, reason="unexpected answer")

    def _expired(self) -> None:
        self.timer = None
        self.expired = True
        if self.current is not None:
            self.current.cancel()        # its errback feeds TEMPERROR and the check goes on

    def _cancel(self) -> None:
        self.expired = True
        if self.current is not None:
            self.current.cancel()

    def _finish(self, outcome) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.check.close()
        if not self.result.called:
            if isinstance(outcome, Failure):
                self.result.errback(outcome)
            else:
                self.result.callback(outcome)


def run_check(check: Check, resolver, reactor, timeout: float) -> Deferred:
    """Deferred[the check's return value]."""
    return _Driver(check, resolver, reactor, timeout).start()


# --- the verifier -------------------------------------------------------------------------------

def _fetch_keys(names: list[str]) -> Check:
    """Look up DKIM key records (TXT), returning {name: DNSResult}."""
    out = {}
    for name in names:
        out[name] = yield Lookup(name, "TXT")
    return out


@implementer(IVerifier)
class Verifier:
    log = Logger(namespace="mailappliance.mailauth")

    def __init__(self, resolver, reactor, threadpool, hostname: str, *, spf: str = "tag",
                 dkim: str = "tag", dmarc: str = "enforce", rng: random.Random | None = None,
                 spf_timeout: float = SPF_TIMEOUT,
                 message_timeout: float = MESSAGE_DNS_TIMEOUT) -> None:
        self.resolver = resolver
        self.reactor = reactor
        self.threadpool = threadpool
        self.hostname = hostname
        self.set_modes(spf, dkim, dmarc)
        # DMARC's pct= sampling needs no secret randomness: a generator seeded once, not a
        # read of os.urandom per message.
        self.rng = rng or random.Random(random.SystemRandom().random())
        self.spf_timeout = spf_timeout
        self.message_timeout = message_timeout

    def set_modes(self, spf: str, dkim: str, dmarc: str) -> None:
        """The [verify] modes (a reload changes them; checks already running keep theirs)."""
        if spf not in MODES_SPF or dkim not in MODES_DKIM or dmarc not in MODES_DMARC:
            raise ValueError(f"bad [verify] modes: spf={spf} dkim={dkim} dmarc={dmarc}")
        self.spf_mode, self.dkim_mode, self.dmarc_mode = spf, dkim, dmarc

    @property
    def active(self) -> bool:
        return (self.spf_mode, self.dkim_mode, self.dmarc_mode) != ("off", "off", "off")

    def check_spf(self, client_ip: str, helo: str, mail_from: str) -> Deferred:
        if self.spf_mode == "off":
            return defer.succeed(None)
        try:
            spf.client_address(client_ip)
        except ValueError:          # not an IP address (a unix-socket client): nothing to check
            return defer.succeed(None)
        d = run_check(spf.check(client_ip, mail_from, helo), self.resolver, self.reactor, self.spf_timeout)
        d.addErrback(self._spf_bug, mail_from)
        return d

    def _spf_bug(self, failure: Failure, mail_from: str):
        self.log.failure("SPF check of {sender} failed", failure, sender=mail_from)
        domain = address_domain(mail_from)
        return spf.SPFResult(spf.TEMPERROR_, "mailfrom", domain, mail_from, "internal error")

    def spf_refusal(self, result, client_ip: str):
        if result is None:
            return None
        return spf_refusal(result, self.spf_mode, client_ip)

    def check_message(self, message: bytes, spf_result) -> Deferred:
        d = defer.ensureDeferred(self._check_message(message, spf_result))
        d.addErrback(self._message_bug, spf_result)
        return d

    def _message_bug(self, failure: Failure, spf_result):
        self.log.failure("message authentication check failed", failure)
        return decide(self.hostname, spf_result, None, None, "off")

    async def _check_message(self, message: bytes, spf_result) -> Verdict:
        fields, _ = split_message(message)
        want_dkim = self.dkim_mode != "off"
        want_dmarc = self.dmarc_mode != "off"
        sigs = dkimverify.signatures(message, fields) if want_dkim else []
        domains, problem = from_domains(fields) if want_dmarc else ([], None)
        keys_d = run_check(_fetch_keys(dkimverify.key_names(sigs)), self.resolver,
                           self.reactor, self.message_timeout)
        discovery = [run_check(dmarc.discover(domain), self.resolver, self.reactor,
                               self.message_timeout) for domain in domains]
        keys = await keys_d
        dkim_results = None
        if want_dkim:
            if not sigs:
                dkim_results = []
            elif len(message) <= INLINE_BYTES and len(sigs) <= INLINE_SIGNATURES:
                dkim_results = dkimverify.verify(message, sigs, keys)
            else:
                dkim_results = await deferToThreadPool(self.reactor, self.threadpool,
                                                       dkimverify.verify, message, sigs, keys)
        dmarc_result = None
        if want_dmarc:
            discovered = [await d for d in discovery]
            passes = [r.domain for r in dkim_results or () if r.result == "pass"]
            spf_word = spf_result.result if spf_result is not None else "none"
            spf_domain = spf_result.domain if spf_result is not None else ""
            dmarc_result = dmarc.combine(domains, problem, discovered, spf_word, spf_domain,
                                         passes, self.rng.random())
        spf_shown = spf_result if self.spf_mode != "off" else None
        forged = any(f.lname == b"authentication-results" for f in fields)
        return decide(self.hostname, spf_shown, dkim_results, dmarc_result, self.dmarc_mode,
                      strip=forged)


# --- the signer ---------------------------------------------------------------------------------

@implementer(ISigner)
class Signer:
    """Signs at injection: a small message on the reactor thread while the keys in memory are
    current (INLINE_BYTES), otherwise in the thread pool (a re-read of data/dkim, a large
    message's canonicalisation; OpenSSL releases the GIL while it signs)."""

    def __init__(self, registry: KeyRegistry, reactor, threadpool,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.reactor = reactor
        self.threadpool = threadpool
        self.clock = clock

    def maybe_keys(self) -> bool:
        """False when there is surely nothing to sign with (KeyRegistry.maybe_keys)."""
        return self.registry.maybe_keys()

    def sign(self, message: bytes, mail_from: str, from_domain: str | None = None,
             linesep: bytes | None = None) -> Deferred:
        return self._run(self._sign, message, mail_from, from_domain, linesep)

    def fit_and_sign(self, message: bytes, mail_from: str,
                     linesep: bytes | None = None) -> Deferred:
        return self._run(self._fit_and_sign, message, mail_from, linesep)

    def _run(self, work, message: bytes, *args) -> Deferred:
        """`work(refresh, message, *args)`: on the reactor thread when the message is small
        (INLINE_BYTES: no line can need re-encoding work worth a thread either) and the keys
        in memory are current -- this one stat says so, and `work` then signs with the keys
        in memory (refresh=False), so no file is read here; otherwise in the thread pool,
        where it checks the directory itself."""
        if len(message) <= INLINE_BYTES and not self.registry.needs_scan():
            return defer.execute(work, False, message, *args)
        return deferToThreadPool(self.reactor, self.threadpool, work, True, message, *args)

    def sign_now(self, message: bytes, mail_from: str, from_domain: str | None = None,
                 linesep: bytes | None = None) -> bytes:
        """The blocking part (pool thread, or a tool without a reactor)."""
        return self._sign(True, message, mail_from, from_domain, linesep)

    def _sign(self, refresh: bool, message: bytes, mail_from: str,
              from_domain: str | None, linesep: bytes | None) -> bytes:
        return sign_with_registry(self.registry, message, mail_from, int(self.clock()),
                                  from_domain, linesep, refresh=refresh)

    def fit_and_sign_now(self, message: bytes, mail_from: str,
                         linesep: bytes | None = None) -> tuple[bytes, bytes]:
        return self._fit_and_sign(True, message, mail_from, linesep)

    def _fit_and_sign(self, refresh: bool, message: bytes, mail_from: str,
                      linesep: bytes | None) -> tuple[bytes, bytes]:
        fitted = fit_lines(message)
        return self._sign(refresh, fitted, mail_from, None, linesep), fitted


# --- the end-of-DATA checks (mailappliance/enddata.py) ------------------------------------------

class VerifyCheck:
    """DKIM and DMARC of mail from the internet, after the final dot: our
    Authentication-Results on top (forged ones claiming our hostname removed), quarantine
    marks, or 550 5.7.1 for a DMARC p=reject failure under dmarc = "enforce"."""

    name = "mailauth"

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def wants(self, tx: Transaction) -> bool:
        return self.verifier.active and not tx.trusted

    def check(self, tx: Transaction, message: bytes) -> Deferred:
        d = self.verifier.check_message(message, tx.spf)
        d.addCallback(self._outcome, message)
        return d

    @staticmethod
    def _outcome(verdict: Verdict, message: bytes) -> Outcome:
        note = f"mailauth: {verdict.action} {verdict.log}"
        if verdict.action == "reject":
            return refuse(verdict.reply, note)
        return accept(message=verdict.apply(message, b"\n"), note=note)


class SignCheck:
    """DKIM signing of mail from our own users (AUTH) and RELAYCLIENT / roaming clients, once,
    before it is queued, while [dkim] sign is on. The fields go on top of what is queued."""

    name = "dkim-sign"

    def __init__(self, signer: ISigner, enabled: Callable[[], bool]) -> None:
        self.signer = signer
        self.enabled = enabled

    def wants(self, tx: Transaction) -> bool:
        return tx.trusted and self.enabled() and self.signer.maybe_keys()

    def check(self, tx: Transaction, message: bytes) -> Deferred:
        """Lines over RFC 5321's limit are re-encoded first (reencode.py), so the signature
        covers the bytes that are sent."""
        d = self.signer.fit_and_sign(message, tx.sender, linesep=b"\n")

        def signed(result) -> Outcome:
            fields, fitted = result
            note = signed_note(fields)
            if fitted is message:
                return accept(headers=fields, note=note)
            note = (note + "; " if note else "") + "long lines re-encoded"
            return accept(headers=fields, message=fitted, note=note)
        d.addCallback(signed)
        return d


def signed_note(fields: bytes) -> str:
    """"dkim-sign: d=example.com s=mail, d=example.com s=ed" for the log ("" when unsigned)."""
    found = re.findall(rb"\bd=([^;\s]+);\s*s=([^;\s]+)", fields)
    if not found:
        return ""
    return "dkim-sign: " + ", ".join(f"d={d.decode('ascii', 'replace')} "
                                     f"s={sel.decode('ascii', 'replace')}" for d, sel in found)


# --- building (service.py) ----------------------------------------------------------------------

@dataclass
class MailAuth:
    """What make_service gets: the verifier, the signer over its key registry, and the
    end-of-DATA checks of each (enddata.py); `follow` is the reload hook."""

    verifier: Verifier
    signer: Signer
    verify_check: VerifyCheck
    sign_check: SignCheck
    follow: Callable[[Any], None]


def build_mailauth(live, resolver, reactor, threadpool) -> MailAuth:
    """`live`: reload.LiveSettings (the signing switch is read from it at each transaction).
    The key registry is read once here, so every unusable key file is one log line at start-up
    (and each new one later, once); the server starts anyway and signs with the other keys."""
    settings = live.settings
    v = settings.verify
    verifier = Verifier(resolver, reactor, threadpool, settings.hostname, spf=v.spf,
                        dkim=v.dkim, dmarc=v.dmarc)
    registry = KeyRegistry(settings.data, report=_report_key_problem)
    registry.refresh()
    signer = Signer(registry, reactor, threadpool)

    def follow(new) -> None:
        nv = new.verify
        verifier.set_modes(nv.spf, nv.dkim, nv.dmarc)
        verifier.hostname = new.hostname

    return MailAuth(verifier, signer, VerifyCheck(verifier),
                    SignCheck(signer, lambda: live.settings.dkim.sign), follow)


_key_log = Logger(namespace="mailappliance.mailauth")


def _report_key_problem(line: str) -> None:
    _key_log.error("dkim: unusable key file, not signing with it: {why}", why=line)
