"""Scanning: the one call the SMTP side makes after the final dot and before the queue commit.

    scanning = Scanning(reactor, virus=ClamdScanner(...), spam=RspamdScorer(...),
                        on_error="tempfail", max_bytes=..., hostname=...)
    d = scanning.check(chunks, trusted=..., client_ip=..., helo=..., sender=...,
                       recipients=..., user=...)          # -> Deferred[Verdict], never fails

- Both scanners are asked at once (the answer takes the slower of the two, not their sum);
  each client's own deadline (`[scan] timeout`) bounds the wait.
- A message over `max_bytes` goes to neither scanner: accepted with a NOT SCANNED header and
  one log line (DESIGN.md: "larger messages are not sent to the scanners (logged)").
- Trusted clients (AUTH, RELAYCLIENT, roaming grant) are scanned for viruses, not scored.
- A scanner that is down or slow costs each message a ScanFailure; `on_error` turns it into
  451 or an unscanned accept (verdict.decide). The outage is logged once when it starts and
  once when the scanner answers again (with how long it lasted and how many messages met it),
  never once per message (verdict.Health).
- `start()` pings the scanners once so the log says at start-up whether they answer; a scanner
  that is down then does not stop anything, and the first message after it comes back finds
  it (no reconnect logic: a scan uses a kept clamd connection or opens a new one, and a dead
  kept connection is simply replaced).
- `close()` closes the connections kept between scans (a reload that replaces this object).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.scan.client import ClamdScanner, RspamdScorer
from mailappliance.scan.endpoints import split_scorer
from mailappliance.scan.interfaces import (
    ISpamScorer, IVirusScanner, ScanEnvelope, ScanFailure, VirusReport, as_chunks,
    message_size)
from mailappliance.scan.verdict import (
    ON_ERROR_VALUES, Health, Outcome, SpamThresholds, State, Transition, Verdict, decide,
    message_id, oversized)

# [scan] max_bytes default (DESIGN.md): clamd's own StreamMaxLength default, 25 MiB, so a
# stock clamd takes every message we send it.
DEFAULT_MAX_BYTES = 26214400

_ACCEPT = Verdict(Outcome.ACCEPT)


class Scanning:
    log = Logger(namespace="mailappliance.scan")

    def __init__(self, reactor, *, virus: IVirusScanner | None = None,
                 spam: ISpamScorer | None = None, on_error: str = "tempfail",
                 max_bytes: int = DEFAULT_MAX_BYTES, hostname: str = "localhost",
                 thresholds: SpamThresholds = SpamThresholds()) -> None:
        self.reactor = reactor
        self.virus = virus
        self.spam = spam
        if on_error not in ON_ERROR_VALUES:
            raise ValueError(f"on_error must be one of {ON_ERROR_VALUES}, not {on_error!r}")
        self.on_error = on_error
        self.max_bytes = int(max_bytes)
        self.hostname = hostname
        self.thresholds = thresholds
        self.health = {s.name: Health(s.name) for s in (virus, spam) if s is not None}
        self._virus_health = self.health[virus.name] if virus is not None else None
        self._clean: Verdict | None = None   # the clean verdict of the virus-only case
        self.counts: Counter = Counter()     # per outcome, for `stat` and benchmarks
        self.settings_key: object = None     # what build_scanning made it from

    @property
    def enabled(self) -> bool:
        return self.virus is not None or self.spam is not None

    # --- start-up ---------------------------------------------------------------------------

    def start(self) -> Deferred:
        """Ping every scanner once and log what answers; fires when all have answered (or
        timed out). Never fails; a scanner that is down only makes a log line."""
        calls = []
        for scanner in (self.virus, self.spam):
            if scanner is None:
                continue
            d = _guard(scanner.ping, scanner.name)
            d.addCallback(self._pinged, scanner.name)
            calls.append(d)
        return defer.gatherResults(calls).addCallback(lambda _: None)

    def _pinged(self, failure: ScanFailure | None, name: str) -> None:
        now = self.reactor.seconds()
        health = self.health[name]
        if failure is None:
            self._log_transition(health.success(now))
        else:
            self._log_transition(health.failure(now, failure.detail, message=False))

    def close(self) -> Deferred:
        """Close the scanner connections kept between scans; fires when they are closed."""
        calls = [s.close() for s in (self.virus, self.spam) if hasattr(s, "close")]
        return defer.gatherResults(calls).addCallback(lambda _: None)

    # --- per message ------------------------------------------------------------------------

    def check(self, message, *, trusted: bool, client_ip: str = "", helo: str | None = None,
              sender: str = "", recipients: Sequence[str] = (), user: str | None = None
              ) -> Deferred:
        """-> Deferred[Verdict]; never fails. `message`: bytes or a sequence of chunks in the
        queue's stored form (LF line ends). Cancelling it cancels the scans."""
        if not self.enabled:
            return defer.succeed(_ACCEPT)
        chunks = as_chunks(message)
        size = message_size(chunks)
        if size > self.max_bytes:
            return defer.succeed(self.too_large(chunks, client_ip))
        virus = self.virus
        if virus is not None and (self.spam is None or trusted):
            # The common case, one scanner: its Deferred carries the verdict (cancelling
            # the check cancels the scan), no gathering of two answers.
            d = _guard(virus.scan, virus.name, chunks)
            return d.addCallback(self._virus_only, chunks, client_ip)
        envelope = ScanEnvelope(client_ip, helo, sender, tuple(recipients), user, self.hostname)
        return _Check(self, chunks, envelope, trusted).result

    def _virus_only(self, result, chunks, client_ip: str) -> Verdict:
        if (type(result) is VirusReport and result.signature is None
                and self._virus_health.state is State.UP):
            # Clean, with clamd known up: the same verdict every time, made once.
            self.counts[Outcome.ACCEPT.value] += 1
            clean = self._clean
            if clean is None:
                clean = self._clean = decide(
                    result, None, on_error=self.on_error, thresholds=self.thresholds,
                    hostname=self.hostname, virus_scanner=self.virus.name)
            return clean
        return _decided(self, result, None, chunks, client_ip)

    def too_large(self, head, client_ip: str = "") -> Verdict:
        """The verdict for a message over max_bytes, logged once (`head`: the message or its
        first chunks, for the Message-ID in the log line)."""
        self.counts["oversized"] += 1
        self.log.info("scan: {ip} message-id {mid}: larger than max_bytes {max_bytes}; not"
                      " scanned", ip=client_ip or "-", mid=message_id(as_chunks(head)) or "-",
                      max_bytes=self.max_bytes)
        return oversized(self.max_bytes, self.hostname)

    def _finish(self, virus, spam, chunks, client_ip: str) -> Verdict:
        now = self.reactor.seconds()
        for scanner, result in ((self.virus, virus), (self.spam, spam)):
            if scanner is None or result is None:
                continue
            health = self.health[scanner.name]
            if not isinstance(result, ScanFailure):
                self._log_transition(health.success(now))
            elif result.outage:
                self._log_transition(health.failure(now, result.detail))
            else:
                # The scanner works but would not take this message (clamd's StreamMaxLength):
                # not an outage, so it is worth a line per message.
                self.log.error("scan: {ip} message-id {mid}: {scanner}: {why}",
                               ip=client_ip or "-",
                               mid=message_id(chunks) or "-", scanner=scanner.name,
                               why=result.detail)
        verdict = decide(virus, spam, on_error=self.on_error, thresholds=self.thresholds,
                         hostname=self.hostname,
                         virus_scanner=self.virus.name if self.virus else "",
                         spam_scorer=self.spam.name if self.spam else "")
        self.counts[verdict.outcome.value] += 1
        outcome = verdict.outcome
        if outcome is Outcome.REFUSE_VIRUS:
            self.log.warn("scan: {ip} message-id {mid}: virus {signature} found by {scanner};"
                          " refused", ip=client_ip or "-",
                          mid=message_id(chunks) or "-", signature=verdict.signature,
                          scanner=self.virus.name)
        elif outcome is Outcome.REFUSE_SPAM:
            self.log.info("scan: {ip} message-id {mid}: spam score {score:.1f} >= {reject:.1f}"
                          " ({scorer}: {symbols}); refused", ip=client_ip or "-",
                          mid=message_id(chunks) or "-", score=verdict.score,
                          reject=verdict.reject_score, scorer=self.spam.name,
                          symbols=",".join(spam.symbols) or "-")
        return verdict

    def _log_transition(self, t: Transition | None) -> None:
        if t is None:
            return
        if t.state is State.DOWN:
            then = ("mail gets 451 until it is back" if self.on_error == "tempfail"
                    else "mail is accepted unscanned until it is back")
            self.log.error("scan: {scanner} unavailable: {why}; {then}", scanner=t.scanner,
                           why=t.detail, then=then)
        elif t.first:
            self.log.info("scan: {scanner} available", scanner=t.scanner)
        else:
            what = "tempfailed" if self.on_error == "tempfail" else "accepted unscanned"
            self.log.info("scan: {scanner} available again after {seconds:.0f} s;"
                          " {n} messages {what} meanwhile", scanner=t.scanner,
                          seconds=t.down_for, n=t.affected, what=what)


class _Check:
    """One message: both scanners at once, one verdict when both have answered."""

    def __init__(self, scanning: Scanning, chunks, envelope: ScanEnvelope,
                 trusted: bool) -> None:
        self.scanning = scanning
        self.chunks = chunks
        self.envelope = envelope
        self.virus_result = None
        self.spam_result = None
        self.pending: list[Deferred] = []
        self.result: Deferred = Deferred(self._cancel)
        self.waiting = 0
        calls = []
        if scanning.virus is not None:
            calls.append(("virus", _guard(scanning.virus.scan, scanning.virus.name, chunks)))
        if scanning.spam is not None and not trusted:
            calls.append(("spam", _guard(scanning.spam.score, scanning.spam.name, chunks,
                                         envelope)))
        self.waiting = len(calls)
        for kind, d in calls:
            self.pending.append(d)
            d.addCallbacks(self._answer, self._lost, callbackArgs=(kind,))
        if not calls:                              # spam only, and a trusted client
            self._decide()

    def _answer(self, result, kind: str) -> None:
        if self.result.called:
            return None
        setattr(self, f"{kind}_result", result)
        self.waiting -= 1
        if self.waiting == 0:
            self._decide()
        return None

    def _lost(self, failure: Failure) -> None:
        return None                                # cancelled along with the check

    def _decide(self) -> None:
        self.result.callback(_decided(self.scanning, self.virus_result, self.spam_result,
                                      self.chunks, self.envelope.client_ip))

    def _cancel(self, d: Deferred) -> None:
        for p in self.pending:
            if not p.called:
                p.cancel()


def _decided(scanning: Scanning, virus, spam, chunks, client_ip: str) -> Verdict:
    try:
        return scanning._finish(virus, spam, chunks, client_ip)
    except Exception:
        # A bug in the policy must not accept mail unscanned, nor hang the session.
        scanning.log.failure("scan: internal error; tempfail")
        return Verdict(Outcome.TEMPFAIL, detail="internal error")


def _guard(call, name: str, *args) -> Deferred:
    """A scanner call whose exceptions (raised or errbacked) become ScanFailure."""
    try:
        d = call(*args)
    except Exception as e:
        return defer.succeed(ScanFailure(f"{name} client error: {e}"))

    def failed(f: Failure):
        if f.check(defer.CancelledError):
            return f
        return ScanFailure(f"{name} client error: {f.getErrorMessage()}")
    return d.addErrback(failed)


def build_scanning(scan, hostname: str, reactor) -> "Scanning | None":
    """The Scanning for `[scan]` settings, or None when neither scanner is configured.

    `scan` has the DESIGN.md keys as attributes (clamd, spam, on_error, timeout, max_bytes)
    and optionally spam_tag_score / spam_reject_score. Raises ValueError for a value that
    cannot work (an unknown on_error, a spam scorer we have no client for, a bad endpoint).
    """
    timeout = float(scan.timeout)
    virus = ClamdScanner(scan.clamd, reactor, timeout=timeout) if scan.clamd else None
    spam = None
    if scan.spam:
        _kind, endpoint = split_scorer(scan.spam)         # only rspamd so far
        spam = RspamdScorer(endpoint, reactor, timeout=timeout)
    if virus is None and spam is None:
        return None
    thresholds = SpamThresholds(
        tag=float(getattr(scan, "spam_tag_score", SpamThresholds.tag)),
        reject=float(getattr(scan, "spam_reject_score", SpamThresholds.reject)))
    scanning = Scanning(reactor, virus=virus, spam=spam, on_error=scan.on_error,
                        max_bytes=scan.max_bytes, hostname=hostname, thresholds=thresholds)
    scanning.settings_key = (scan, hostname)          # a reload with the same keys keeps it
    return scanning
