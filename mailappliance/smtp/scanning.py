"""The SMTP side of content scanning: a scan Verdict as the reply to the final dot.

mailappliance/scan decides (typed Verdict); this module maps the refusals to the reply table
in smtp/replies.py, as the DNSBL's Refusal and the relay policy's Verdict are mapped there.
"""

from __future__ import annotations

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
