"""The SMTP side of content scanning (docs/SCANNING.md): the message held back from the queue
writer during DATA, and the scan Verdict as the reply to the final dot.

mailappliance/scan decides (typed Verdict); this module maps the refusals to the reply table
in smtp/replies.py, as the DNSBL's Refusal and the relay policy's Verdict are mapped there.
smtp/protocol.py opens a HeldMessage at DATA when `app.scanning` is set, and at the final dot
asks for the verdict before the queue commit.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from mailappliance.scan.verdict import Outcome, Verdict
from mailappliance.smtp import replies
from mailappliance.smtp.replies import Reply


def scan_reply(verdict: Verdict) -> Reply | None:
    """The reply that refuses the message, or None when the verdict accepts it (the queue
    commit then answers, after writing `verdict.header_bytes()` above the message)."""
    outcome = verdict.outcome
    if outcome is Outcome.REFUSE_VIRUS:
        return replies.virus_found(verdict.signature or "unknown")
    if outcome is Outcome.REFUSE_SPAM:
        return replies.spam_refused(verdict.score or 0.0, verdict.reject_score or 0.0)
    if outcome is Outcome.TEMPFAIL:
        return replies.SCAN_TEMPORARY
    return None


class HeldMessage:
    """The DATA pieces of one message, kept back from the queue writer until the verdict.

    The writer already holds our Received: line; the verdict's headers go under it, then the
    message (scan headers can only go above a message that has not been written yet). Memory:
    at most max_bytes (and never more than databytes: the SMTP core passes no piece beyond
    it). A message that grows past max_bytes will go to no scanner, so at that moment its
    NOT SCANNED header and the pieces so far go to the writer and the rest streams on as
    without scanning.
    """

    def __init__(self, scanning, writer, client_ip: str) -> None:
        self.scanning = scanning
        self.writer = writer
        self.client_ip = client_ip
        self.chunks: list[bytes] = []
        self.size = 0
        self.passed: Verdict | None = None    # set once over max_bytes: streaming since

    def write(self, chunk: bytes) -> None:
        if self.passed is not None:
            self.writer.write(chunk)
            return
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.size > self.scanning.max_bytes:
            self.passed = self.scanning.too_large(self.chunks, self.client_ip)
            self._release(self.passed)

    @property
    def pending_bytes(self) -> int:
        return self.writer.pending_bytes

    def check(self, *, trusted: bool, helo: str | None, sender: str,
              recipients) -> Deferred:
        """Deferred[Verdict] for the whole message (never fails; cancel() cancels the scans)."""
        if self.passed is not None:
            return succeed(self.passed)
        return self.scanning.check(self.chunks, trusted=trusted, client_ip=self.client_ip,
                                   helo=helo, sender=sender, recipients=list(recipients))

    def accept(self, verdict: Verdict) -> None:
        """The verdict accepts: its headers, then the held pieces, into the writer (already
        done for a message that passed max_bytes)."""
        if self.passed is None:
            self._release(verdict)

    def _release(self, verdict: Verdict) -> None:
        writer = self.writer
        headers = verdict.header_bytes()
        if headers:
            writer.write(headers)
        for chunk in self.chunks:
            writer.write(chunk)
        self.chunks = []
