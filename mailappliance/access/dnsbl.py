"""DNSBL checks, as rblsmtpd does them: a pure verdict core and a thin Twisted adapter.

rblsmtpd semantics (ucspi-tcp 0.88, rblsmtpd.c), with our configuration keys:

- `RBLSMTPD` in the rules environment decides first: set and empty skips every check; set to
  text refuses with 451 and that text; set to `-text` refuses with 553 and that text.
- `[smtp] dnsbl_allow` zones (rblsmtpd -a): an A record for the client there means "accept
  without consulting further lists".
- `[smtp] dnsbl` zones (rblsmtpd -r): an A record for the client means listed. The zone's TXT
  record for the same name, if any, is the reason; rblsmtpd cuts it to 200 characters and
  replaces non-printable characters. Listed means 451 (rblsmtpd -B, its default), or 553 with
  `[smtp] dnsbl_permanent = true` (rblsmtpd -b).
- A failed lookup (timeout after `dnsbl_timeout`, SERVFAIL, REFUSED, unreachable server) means
  "not listed" and a log line, as rblsmtpd's default (-C); with `dnsbl_fail_closed = true`
  (rblsmtpd -c) it refuses with 451 "temporary RBL lookup error" instead. DNS trouble never
  produces a 5xx.

One refinement over rblsmtpd: DNSBL answers are addresses in 127.0.0.0/8 (RFC 5782 section
2.3). An A record outside that range is what a parked or hijacked list domain with a wildcard
returns; counting it as "listed" would refuse every client, so it is logged and treated as a
failed lookup (fail open, or 451 when failing closed).

The zones are queried in parallel; the resolver caches answers for their TTL (negative answers
for the SOA minimum, capped) and shares identical in-flight queries, so a flood of connections
from one address costs one lookup. Names: reversed IPv4 octets ("4.3.2.1.zone") or reversed
IPv6 nibbles (32 labels), RFC 5782 section 2.1 and 2.4. An IPv4-mapped IPv6 client
(::ffff:1.2.3.4) is looked up as the IPv4 address.

The SMTP protocol calls `app.dnsbl.check(ip, env)` once per connection at connect and applies
the Refusal where rblsmtpd does: the greeting, HELO/EHLO, MAIL, RSET and NOOP are answered as
usual (rblsmtpd's "250 rblsmtpd.local"), every RCPT gets the refusal, so no recipient and hence
no message is ever accepted from a listed client. Only RCPT waits for the answers: the lookups
run while the client greets and sends MAIL, and the greeting is never delayed.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Mapping, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailappliance.dns import Answer, DNSError

# rblsmtpd.c: the TXT reason (and RBLSMTPD text) is cut to 200 characters.
MAX_REASON = 200
# rblsmtpd.c replaces characters outside printable ASCII in the reason.
REPLACEMENT = "?"
# rblsmtpd -c wording for a failed lookup when failing closed.
FAIL_CLOSED_TEXT = "temporary RBL lookup error"
# RFC 5782 section 2.3: DNSBL A records are in 127.0.0.0/8.
DNSBL_ANSWERS = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True)
class Refusal:
    """SMTP answers every MAIL/RCPT with 553 (permanent) or 451 and `text`."""

    permanent: bool
    text: str

    @property
    def code(self) -> int:
        return 553 if self.permanent else 451


# --- the pure core ----------------------------------------------------------------------------

def sanitize(text: str) -> str:
    """rblsmtpd's treatment of reason text: at most 200 characters, printable ASCII only."""
    return "".join(c if " " <= c <= "~" else REPLACEMENT for c in text[:MAX_REASON])


def query_prefix(client_ip: str) -> str | None:
    """The reversed form of the address for a DNSBL query, or None if it is not an IP."""
    try:
        ip = ipaddress.ip_address(client_ip.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


def env_decision(env: Mapping[str, str]) -> Refusal | None | bool:
    """What RBLSMTPD says: False (not set: consult the lists), None (empty: skip), a Refusal."""
    if "RBLSMTPD" not in env:
        return False
    text = env["RBLSMTPD"]
    if text == "":
        return None
    if text.startswith("-"):
        return Refusal(True, sanitize(text[1:]))
    return Refusal(False, sanitize(text))


class Status(enum.Enum):
    LISTED = "listed"
    CLEAR = "clear"
    ERROR = "error"


@dataclass(frozen=True)
class ZoneResult:
    zone: str
    status: Status
    detail: str = ""       # LISTED: the reason text; ERROR: what went wrong


def classify(zone: str, a_answer: Answer | DNSError) -> ZoneResult:
    """The A lookup of one zone: listed, clear (NXDOMAIN/NODATA) or a lookup error."""
    if isinstance(a_answer, DNSError):
        return ZoneResult(zone, Status.ERROR, a_answer.reason)
    addrs = a_answer.addresses()
    if not addrs:
        return ZoneResult(zone, Status.CLEAR)
    if not any(ipaddress.ip_address(a) in DNSBL_ANSWERS for a in addrs):
        return ZoneResult(zone, Status.ERROR,
                          f"answer {addrs[0]} is outside 127.0.0.0/8 (RFC 5782), ignored")
    return ZoneResult(zone, Status.LISTED)


def reason_text(client_ip: str, zone: str, txt: Answer | DNSError | None) -> str:
    """The TXT reason, or our default when the list publishes none."""
    if isinstance(txt, Answer):
        texts = txt.texts()
        if texts:
            return sanitize(texts[0])
    return sanitize(f"client {client_ip} is listed in {zone}")


@dataclass(frozen=True)
class Verdict:
    refusal: Refusal | None
    zone: str | None = None             # the zone (or "RBLSMTPD") that decided, for the log
    errors: tuple[ZoneResult, ...] = ()


def verdict(allow: Sequence[ZoneResult], block: Sequence[ZoneResult], *,
            permanent: bool, fail_closed: bool) -> Verdict:
    """rblsmtpd's decision from per-zone results, each list in configuration order.

    An allow-listed client is accepted whatever the other lists say; otherwise the first
    listing block zone refuses; otherwise a lookup error refuses only when failing closed.
    """
    errors = tuple(r for r in (*allow, *block) if r.status is Status.ERROR)
    for r in allow:
        if r.status is Status.LISTED:
            return Verdict(None, r.zone, errors)
    for r in block:
        if r.status is Status.LISTED:
            return Verdict(Refusal(permanent, r.detail), r.zone, errors)
    if errors and fail_closed:
        return Verdict(Refusal(False, FAIL_CLOSED_TEXT), errors[0].zone, errors)
    return Verdict(None, None, errors)


# --- the adapter ------------------------------------------------------------------------------

class IDNSBLChecker(Interface):
    def check(client_ip, env):
        """Deferred[Refusal | None]; never fails."""


@implementer(IDNSBLChecker)
class DNSBLChecker:
    """app.dnsbl: `check(client_ip, env) -> Deferred[Refusal | None]`, never failing.

    resolver: an IResolver (mailappliance.dns.Resolver, or FakeResolver in tests).
    reactor: provides callLater for the `timeout` deadline (dnsbl_timeout, rblsmtpd -t).
    """

    log = Logger()

    def __init__(self, resolver, reactor, zones: Sequence[str] = (),
                 allow_zones: Sequence[str] = (), *, timeout: float = 60,
                 permanent: bool = False, fail_closed: bool = False) -> None:
        self.resolver = resolver
        self.reactor = reactor
        # Counters since start for `stat` and the metrics: clients looked up, verdicts that
        # refused, and list lookups cut by the dnsbl_timeout deadline (the resolver counts
        # only the tries it gave up on itself, 5 s each, so a shorter deadline cuts first).
        self.stats = {"checks": 0, "refusals": 0, "timeouts": 0}
        self.configure(zones, allow_zones, timeout=timeout, permanent=permanent,
                       fail_closed=fail_closed)

    @classmethod
    def from_settings(cls, settings, resolver, reactor) -> "DNSBLChecker":
        smtp = settings.smtp
        return cls(resolver, reactor, smtp.dnsbl, smtp.dnsbl_allow,
                   timeout=smtp.dnsbl_timeout, permanent=smtp.dnsbl_permanent,
                   fail_closed=smtp.dnsbl_fail_closed)

    def configure(self, zones: Sequence[str], allow_zones: Sequence[str], *, timeout: float,
                  permanent: bool, fail_closed: bool) -> None:
        """(Re)load the lists; used at start and on `mailappliance reload`."""
        self.zones = tuple(z.lower().rstrip(".") for z in zones)
        self.allow_zones = tuple(z.lower().rstrip(".") for z in allow_zones)
        self.timeout = float(timeout)
        self.permanent = permanent
        self.fail_closed = fail_closed

    def reload(self, settings) -> None:
        smtp = settings.smtp
        self.configure(smtp.dnsbl, smtp.dnsbl_allow, timeout=smtp.dnsbl_timeout,
                       permanent=smtp.dnsbl_permanent, fail_closed=smtp.dnsbl_fail_closed)

    def check(self, client_ip: str, env: Mapping[str, str]) -> Deferred:
        decided = env_decision(env)
        if decided is None:
            return defer.succeed(None)
        if isinstance(decided, Refusal):
            self._log_refusal(client_ip, "RBLSMTPD", decided)
            return defer.succeed(decided)
        if not self.zones:
            return defer.succeed(None)
        prefix = query_prefix(client_ip)
        if prefix is None:           # not an IP client (a unix socket): nothing to look up
            return defer.succeed(None)
        self.stats["checks"] += 1
        return _Check(self, client_ip, prefix).run()

    def _log_refusal(self, ip: str, zone: str, refusal: Refusal) -> None:
        # rblsmtpd logs "rblsmtpd: IP pid PID: 451 text"; we name the deciding zone too.
        self.log.info("rblsmtpd: {ip} {zone}: {code} {text}", ip=ip, zone=zone,
                      code=refusal.code, text=refusal.text)


class _Check:
    """One client's lookups: every zone in parallel, one deadline, one verdict.

    Explicit callbacks and a countdown rather than gatherResults: this runs for every
    connection, and the Deferred plumbing used to cost as much as the lookups.
    """

    def __init__(self, checker: DNSBLChecker, ip: str, prefix: str) -> None:
        self.checker = checker
        self.ip = ip
        self.prefix = prefix
        self.zones = [(z, False) for z in checker.allow_zones] + \
            [(z, True) for z in checker.zones]
        self.results: list[ZoneResult | None] = [None] * len(self.zones)
        self.waiting = len(self.zones)
        self.pending: list[Deferred] = []
        self.timed_out = False
        self.deadline = None
        self.result: Deferred = Deferred()

    def run(self) -> Deferred:
        c = self.checker
        self.deadline = c.reactor.callLater(c.timeout, self._expire)
        for i, (zone, want_reason) in enumerate(self.zones):
            name = f"{self.prefix}.{zone}"
            d = self._query(name, "A")
            d.addCallbacks(self._a_answer, self._a_failed,
                           callbackArgs=(i, zone, name, want_reason), errbackArgs=(i, zone, name))
        return self.result

    def _query(self, name: str, rdtype: str) -> Deferred:
        try:
            d = self.checker.resolver.query(name, rdtype, self.checker.timeout)
        except Exception:       # a broken resolver must not break the SMTP session
            d = defer.fail()
        self.pending.append(d)
        return d

    def _a_answer(self, answer: Answer, i: int, zone: str, name: str, want_reason: bool) -> None:
        result = classify(zone, answer)
        if result.status is not Status.LISTED or not want_reason or self.timed_out:
            self._done(i, result if result.status is not Status.LISTED else
                       ZoneResult(zone, Status.LISTED, reason_text(self.ip, zone, None)))
            return
        t = self._query(name, "TXT")
        # A TXT lookup that fails or is cut by the deadline still leaves the client listed.
        t.addCallbacks(lambda txt: self._done(i, ZoneResult(
                           zone, Status.LISTED, reason_text(self.ip, zone, txt))),
                       lambda f: self._done(i, ZoneResult(
                           zone, Status.LISTED, reason_text(self.ip, zone, None))))

    def _a_failed(self, failure: Failure, i: int, zone: str, name: str) -> None:
        self._done(i, classify(zone, self._as_error(failure, name)))

    def _done(self, i: int, result: ZoneResult) -> None:
        if self.result.called or self.results[i] is not None:
            return
        self.results[i] = result
        self.waiting -= 1
        if self.waiting == 0:
            try:
                refusal = self._decide()
            except Exception:
                # The checker must never fail the SMTP session; a bug here fails open, loudly.
                self.checker.log.failure("rblsmtpd: {ip}: internal error, not checked",
                                         ip=self.ip)
                refusal = None
            self.result.callback(refusal)

    def _decide(self) -> Refusal | None:
        c = self.checker
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        n_allow = len(c.allow_zones)
        v = verdict(self.results[:n_allow], self.results[n_allow:],
                    permanent=c.permanent, fail_closed=c.fail_closed)
        for err in v.errors:
            c.log.warn("rblsmtpd: {ip} {zone}: lookup error: {why}", ip=self.ip,
                       zone=err.zone, why=err.detail)
        if v.refusal is not None:
            c.stats["refusals"] += 1
            c._log_refusal(self.ip, v.zone or "", v.refusal)
        return v.refusal

    def _as_error(self, failure: Failure, name: str) -> DNSError:
        if failure.check(defer.CancelledError):
            return _Timeout(name, f"no answer within {self.checker.timeout:g} s")
        if failure.check(DNSError):
            return failure.value
        return _Timeout(name, f"lookup failed: {failure.getErrorMessage()}")

    def _expire(self) -> None:
        self.timed_out = True
        self.checker.stats["timeouts"] += sum(1 for r in self.results if r is None)
        for d in list(self.pending):
            if not d.called:
                d.cancel()
        # Whatever still has no result (a resolver that ignores cancel) is a lookup error now:
        # the deadline is a promise to the SMTP session.
        why = f"no answer within {self.checker.timeout:g} s"
        for i, (zone, _) in enumerate(self.zones):
            if self.results[i] is None:
                self._done(i, ZoneResult(zone, Status.ERROR, why))


class _Timeout(DNSError):
    """The dnsbl_timeout deadline passed (or the lookup broke): treated as a failed lookup."""
