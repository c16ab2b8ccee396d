"""The scanning decision, its headers and the scanners' health: pure, no Twisted, no clock.

`decide()` turns what the virus scanner and the spam scorer said into one Verdict, in this
order of precedence (the first that applies wins):

    virus found                                   REFUSE_VIRUS   554 5.7.0 naming the signature
    spam score >= reject                          REFUSE_SPAM    550 5.7.1
    a scanner failed, on_error = "tempfail"       TEMPFAIL       451 4.3.0, nothing stored
    a scanner failed, on_error = "accept"         ACCEPT_UNSCANNED, with a header saying so
    otherwise                                     ACCEPT, with the verdict headers

A definite answer beats a failure: a message the scorer refuses as spam is refused even while
clamd is down (the refusal does not depend on the virus scan). A message over max_bytes is sent
to no scanner (`oversized()`): accepted with a NOT SCANNED header, under either on_error.

Headers (stored form, LF line ends), put above the message by the SMTP side:

    X-Virus-Scanned: clean (clamd) on mx.example.org
    X-Virus-Scanned: NOT SCANNED on mx.example.org: clamd unavailable: <why>
    X-Spam-Flag: YES                              (only at or above the tag score)
    X-Spam-Score: 7.5
    X-Spam-Level: *******                         (one star per whole point, as SpamAssassin)
    X-Spam-Status: Yes, score=7.5 tag=6.0 reject=15.0 scorer=rspamd
        tests=SYMBOL_ONE,SYMBOL_TWO     (folded: the continuation starts with a TAB)
    X-Spam-Status: NOT SCORED on mx.example.org: rspamd unavailable: <why>

Mail from trusted clients (AUTH, RELAYCLIENT, roaming grants) is scanned for viruses but not
scored for spam, and gets no X-Spam-* headers.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from mailappliance.scan.interfaces import Message, ScanFailure, SpamReport, SpamResult, VirusResult

# Default thresholds: rspamd's own default actions (add_header at 6, reject at 15); the tag
# score is near SpamAssassin's required_score of 5.0, the reject score far enough above it that
# only mail that hits several strong rules is refused outright.
DEFAULT_TAG_SCORE = 6.0
DEFAULT_REJECT_SCORE = 15.0
# X-Spam-Level stars, capped as SpamAssassin caps them (50).
MAX_STARS = 50
# Characters of a failure's detail carried into a header: it names the scanner's trouble
# ("connection refused", "no answer within 30 s"), never needs more.
MAX_DETAIL = 120
# Bytes of the message searched for the Message-ID header (for the log): RFC 5322's header
# section has no limit, but a Message-ID past the first 64 KiB is not worth a longer search.
MESSAGE_ID_SEARCH = 64 * 1024
# Characters of a Message-ID kept for the log line (RFC 5322 msg-id are short; spam is not).
MAX_MESSAGE_ID = 200

ON_ERROR_VALUES = ("tempfail", "accept")

HEADER_VIRUS = "X-Virus-Scanned"
HEADER_SPAM_FLAG = "X-Spam-Flag"
HEADER_SPAM_SCORE = "X-Spam-Score"
HEADER_SPAM_LEVEL = "X-Spam-Level"
HEADER_SPAM_STATUS = "X-Spam-Status"
# Every header we add; a filter downstream should believe the topmost of each.
HEADERS = (HEADER_VIRUS, HEADER_SPAM_FLAG, HEADER_SPAM_SCORE, HEADER_SPAM_LEVEL,
           HEADER_SPAM_STATUS)


class Outcome(enum.Enum):
    ACCEPT = "accept"
    ACCEPT_UNSCANNED = "accept-unscanned"
    REFUSE_VIRUS = "refuse-virus"
    REFUSE_SPAM = "refuse-spam"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class SpamThresholds:
    tag: float = DEFAULT_TAG_SCORE          # X-Spam-Flag: YES at or above
    reject: float = DEFAULT_REJECT_SCORE    # 550 5.7.1 at or above

    def __post_init__(self) -> None:
        for v in (self.tag, self.reject):
            if not math.isfinite(v):
                raise ValueError("spam thresholds must be finite numbers")


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    headers: tuple[tuple[str, str], ...] = ()
    signature: str | None = None            # REFUSE_VIRUS: the signature name
    score: float | None = None              # the spam score when there was one
    reject_score: float | None = None       # REFUSE_SPAM: the threshold it reached
    detail: str = ""                        # TEMPFAIL / ACCEPT_UNSCANNED: why (for the log)

    @property
    def accepted(self) -> bool:
        return self.outcome in (Outcome.ACCEPT, Outcome.ACCEPT_UNSCANNED)

    def header_bytes(self) -> bytes:
        """The headers in stored form (LF line ends), to be written above the message."""
        return "".join(f"{name}: {value}\n" for name, value in self.headers).encode(
            "ascii", "replace")


def _detail(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_DETAIL])


def _score(value: float) -> str:
    return f"{value:.1f}"


def spam_headers(report: SpamReport, thresholds: SpamThresholds,
                 scorer: str) -> tuple[tuple[str, str], ...]:
    tagged = report.score >= thresholds.tag
    stars = "*" * max(0, min(MAX_STARS, int(report.score)))
    status = (f"{'Yes' if tagged else 'No'}, score={_score(report.score)}"
              f" tag={_score(thresholds.tag)} reject={_score(thresholds.reject)}"
              f" scorer={scorer}")
    if report.symbols:
        status += "\n\ttests=" + _fold(report.symbols)
    headers = [(HEADER_SPAM_SCORE, _score(report.score)), (HEADER_SPAM_LEVEL, stars),
               (HEADER_SPAM_STATUS, status)]
    if tagged:
        headers.insert(0, (HEADER_SPAM_FLAG, "YES"))
    return tuple(headers)


def _fold(symbols: tuple[str, ...], width: int = 70) -> str:
    """Comma-separated names, folded (RFC 5322 section 2.2.3) before a line passes `width`."""
    lines, line = [], ""
    for name in symbols:
        piece = name + ","
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
    lines.append(line.rstrip(","))
    return "\n\t".join(lines)


def decide(virus: VirusResult | None, spam: SpamResult | None, *, on_error: str,
           thresholds: SpamThresholds, hostname: str, virus_scanner: str = "clamd",
           spam_scorer: str = "rspamd") -> Verdict:
    """One verdict from the two answers; None means that scanner was not asked (not
    configured, or spam for a trusted client)."""
    if on_error not in ON_ERROR_VALUES:
        raise ValueError(f"on_error must be one of {ON_ERROR_VALUES}, not {on_error!r}")
    score = spam.score if isinstance(spam, SpamReport) else None
    if virus is not None and not isinstance(virus, ScanFailure) and virus.infected:
        return Verdict(Outcome.REFUSE_VIRUS, signature=virus.signature, score=score)
    if score is not None and score >= thresholds.reject:
        return Verdict(Outcome.REFUSE_SPAM, score=score, reject_score=thresholds.reject)
    failures = []
    headers: list[tuple[str, str]] = []
    if isinstance(virus, ScanFailure):
        why = f"{virus_scanner} unavailable: {_detail(virus.detail)}"
        failures.append(why)
        headers.append((HEADER_VIRUS, f"NOT SCANNED on {hostname}: {why}"))
    elif virus is not None:
        headers.append((HEADER_VIRUS, f"clean ({virus_scanner}) on {hostname}"))
    if isinstance(spam, ScanFailure):
        why = f"{spam_scorer} unavailable: {_detail(spam.detail)}"
        failures.append(why)
        headers.append((HEADER_SPAM_STATUS, f"NOT SCORED on {hostname}: {why}"))
    elif spam is not None:
        headers.extend(spam_headers(spam, thresholds, spam_scorer))
    if failures:
        detail = "; ".join(failures)
        if on_error == "tempfail":
            return Verdict(Outcome.TEMPFAIL, score=score, detail=detail)
        return Verdict(Outcome.ACCEPT_UNSCANNED, tuple(headers), score=score, detail=detail)
    return Verdict(Outcome.ACCEPT, tuple(headers), score=score)


def oversized(max_bytes: int, hostname: str) -> Verdict:
    """A message over max_bytes goes to no scanner: accepted, and marked as not scanned. (The
    SMTP side decides this while the message still arrives, so its final size is not known.)"""
    why = f"message larger than the scan limit of {max_bytes} bytes"
    return Verdict(Outcome.ACCEPT_UNSCANNED,
                   ((HEADER_VIRUS, f"NOT SCANNED on {hostname}: {why}"),), detail=why)


def message_id(message: Message, search: int = MESSAGE_ID_SEARCH) -> str | None:
    """The Message-ID header's value (unfolded, printable, cut), for the log; None if absent
    from the header section's first `search` bytes."""
    head = bytearray()
    for chunk in message:
        head += chunk[:search - len(head)]
        if len(head) >= search or b"\n\n" in head:
            break
    if head.startswith(b"\n"):
        return None
    end = head.find(b"\n\n")
    if end >= 0:
        del head[end + 1:]
    lines = bytes(head).split(b"\n")
    for i, line in enumerate(lines):
        if line[:11].lower() == b"message-id:":
            value = line[11:]
            for cont in lines[i + 1:]:
                if cont[:1] not in (b" ", b"\t"):
                    break
                value += cont
            text = value.strip().decode("ascii", "replace")
            return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_MESSAGE_ID]) or None
    return None


# --- health: outages and recoveries logged once each ------------------------------------------

class State(enum.Enum):
    UNKNOWN = "unknown"     # no answer seen yet (start-up)
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Transition:
    """A change worth one log line."""

    scanner: str
    state: State             # the new state
    detail: str = ""         # DOWN: why
    down_for: float = 0.0    # UP after DOWN: seconds the outage lasted
    affected: int = 0        # UP after DOWN: messages that met the outage
    first: bool = False      # UP from UNKNOWN: the first answer since start-up


class Health:
    """One scanner's availability as the messages see it.

    `success(now)` / `failure(now, detail)` after every answer return a Transition when the
    state changes (UNKNOWN -> UP, anything -> DOWN, DOWN -> UP) and None otherwise, so a
    thousand messages during an outage make two log lines, not a thousand. Failures that are
    not outages (a per-message limit) are not reported here.
    """

    def __init__(self, scanner: str) -> None:
        self.scanner = scanner
        self.state = State.UNKNOWN
        self.since: float | None = None
        self.affected = 0

    def success(self, now: float) -> Transition | None:
        prev = self.state
        if prev is State.UP:
            return None
        self.state = State.UP
        if prev is State.UNKNOWN:
            self.since = now
            return Transition(self.scanner, State.UP, first=True)
        down_for = max(0.0, now - self.since) if self.since is not None else 0.0
        affected, self.affected = self.affected, 0
        self.since = now
        return Transition(self.scanner, State.UP, down_for=down_for, affected=affected)

    def failure(self, now: float, detail: str, message: bool = True) -> Transition | None:
        """`message`: a message met this failure (False for a start-up or health probe)."""
        if message:
            self.affected += 1
        if self.state is State.DOWN:
            return None
        self.state = State.DOWN
        self.since = now
        return Transition(self.scanner, State.DOWN, detail=_detail(detail))
