"""What a scanner answers, and the two interfaces every scanner client provides.

A scanner's Deferred never fails: it fires with a report, or with a `ScanFailure` saying why
there is none (down, slow, garbage, a limit). Deciding what a failure means for the message
(tempfail or accept unscanned) is the policy's job, not the client's.

Messages are handed over as a sequence of byte chunks in the queue's stored form (lines end in
LF), as the SMTP side receives them, so nobody has to join them into one copy first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, Union

from zope.interface import Attribute, Interface

Message = Sequence[bytes]          # chunks (bytes, bytearray or memoryview), in order


def as_chunks(message: "bytes | bytearray | memoryview | Message") -> Message:
    """Accept one bytes-like object or a sequence of them."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        return (message,)
    return message


def message_size(message: Message) -> int:
    return sum(len(c) for c in message)


def batches(message: Message, size: int, views: bool = False
            ) -> Iterator[tuple[int, list]]:
    """The message as (length, [piece, ...]) runs of `size` bytes (the last one may be
    shorter), gathered across chunk boundaries. A chunk that fits whole is passed on as it is;
    only a chunk cut at a run boundary is sliced. The pieces are bytes (a chunk of another
    type, or a slice, copied: Twisted's writeSequence takes bytes only), or with `views`
    memoryviews of the message's own chunks where they are not bytes (for socket.sendmsg:
    nothing of the message is copied)."""
    parts: list = []
    total = 0
    for chunk in message:
        if type(chunk) is not bytes:
            chunk = memoryview(chunk).cast("B")      # its length in bytes, not in items
        n = len(chunk)
        if not n:
            continue
        if total + n <= size:
            parts.append(chunk if views or type(chunk) is bytes else bytes(chunk))
            total += n
            if total == size:
                yield total, parts
                parts, total = [], 0
            continue
        view = memoryview(chunk).cast("B")
        while len(view):
            take = min(size - total, len(view))
            parts.append(view[:take] if views else bytes(view[:take]))
            total += take
            view = view[take:]
            if total == size:
                yield total, parts
                parts, total = [], 0
    if total:
        yield total, parts


@dataclass(frozen=True)
class ScanFailure:
    """No verdict for this message.

    outage: True when the scanner itself is unusable (refused, closed, timed out, answered
    garbage) -- the policy logs outages once and recoveries once; False when the scanner works
    but refused this message (clamd's StreamMaxLength), logged per message.
    """

    detail: str
    outage: bool = True


@dataclass(frozen=True)
class VirusReport:
    signature: str | None          # None: clean; else the signature name the scanner gave

    @property
    def infected(self) -> bool:
        return self.signature is not None


@dataclass(frozen=True)
class SpamReport:
    score: float
    symbols: tuple[str, ...] = ()  # the rules that hit, for the X-Spam-Status header and log
    action: str | None = None      # the scorer's own opinion (rspamd's action), informational


VirusResult = Union[VirusReport, ScanFailure]
SpamResult = Union[SpamReport, ScanFailure]


@dataclass(frozen=True)
class ScanEnvelope:
    """What the scorer may know besides the message (rspamd takes these as request headers)."""

    client_ip: str = ""
    helo: str | None = None
    sender: str = ""
    recipients: tuple[str, ...] = ()
    user: str | None = None        # AUTH login, if any
    hostname: str | None = None    # our own name (rspamd's MTA-Name)


class IVirusScanner(Interface):
    name = Attribute("short name for logs and headers, e.g. 'clamd'")
    timeout = Attribute("seconds: scan() and ping() fire no later than this after the call")

    def scan(message):
        """Deferred[VirusReport | ScanFailure] for a Message; never fails, fires within
        `timeout`; cancelling it closes the scanner connection."""

    def ping():
        """Deferred[ScanFailure | None]: None when the scanner answers its health check."""


class ISpamScorer(Interface):
    name = Attribute("short name for logs and headers, e.g. 'rspamd'")
    timeout = Attribute("seconds: score() and ping() fire no later than this after the call")

    def score(message, envelope):
        """Deferred[SpamReport | ScanFailure] for a Message and its ScanEnvelope; never fails,
        fires within `timeout`; cancelling it closes the scorer connection."""

    def ping():
        """Deferred[ScanFailure | None]: None when the scorer answers its health check."""
