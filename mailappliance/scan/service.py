"""Content scanning as an end-of-DATA check (enddata.py): what the SMTP session runs between
the final dot and the queue commit, after mail authentication and before DKIM signing.

    scan = ScanCheck(settings, reactor)       # in app.end_of_data; scan.follow is a reload hook
    scan.start()                              # once the reactor runs: PING each scanner, log it

`wants(tx)` is true whenever `[scan] clamd` or `spam` is set: the session then holds the
message (enddata.HeldMessage, bounded by databytes) and `check(tx, message)` asks
policy.Scanning for the Verdict, which becomes the check's Outcome:

    REFUSE_VIRUS      refuse(554 5.7.0 naming the signature)
    REFUSE_SPAM       refuse(550 5.7.1 with the score)
    TEMPFAIL          tempfail(451 4.3.0)
    ACCEPT, ACCEPT_UNSCANNED    accept(headers=the verdict's X-Virus-Scanned / X-Spam-* fields)

The reply texts live in smtp/replies.py with every other reply. Scanning logs its own events
(verdicts, outcomes once), so the Outcome carries no note.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from mailappliance.enddata import Outcome as CheckOutcome
from mailappliance.enddata import Transaction, accept, refuse, tempfail
from mailappliance.scan.policy import Scanning, build_scanning
from mailappliance.scan.verdict import Outcome, Verdict
from mailappliance.smtp import replies
from mailappliance.smtp.replies import Reply


def scan_reply(verdict: Verdict) -> Reply | None:
    """The reply that refuses the message, or None when the verdict accepts it."""
    outcome = verdict.outcome
    if outcome is Outcome.REFUSE_VIRUS:
        return replies.virus_found(verdict.signature or "unknown")
    if outcome is Outcome.REFUSE_SPAM:
        return replies.spam_refused(verdict.score or 0.0, verdict.reject_score or 0.0)
    if outcome is Outcome.TEMPFAIL:
        return replies.SCAN_TEMPORARY
    return None


def check_outcome(verdict: Verdict) -> CheckOutcome:
    reply = scan_reply(verdict)
    if reply is None:
        return accept(headers=verdict.header_bytes())
    if reply.code >= 500:
        return refuse(reply)
    return tempfail(reply)


class ScanCheck:
    """The `[scan]` end-of-data check; `scanning` is None while nothing is configured."""

    name = "scan"

    def __init__(self, settings, reactor) -> None:
        self.reactor = reactor
        self.scanning: Scanning | None = build_scanning(settings.scan, settings.hostname,
                                                        reactor)
        self._clean: tuple[Verdict, CheckOutcome] | None = None   # the last ACCEPT, made once

    def start(self) -> Deferred | None:
        """Ping the scanners once (the log says whether they answer); never fails."""
        return self.scanning.start() if self.scanning is not None else None

    def follow(self, settings) -> None:
        """Reload hook: changed [scan] keys (or hostname) make a new Scanning, pinged once.
        Messages being scanned finish with the old one, which then keeps no connection."""
        old = self.scanning
        key = (settings.scan, settings.hostname)
        if old is not None and old.settings_key == key:
            return
        if old is None and not (settings.scan.clamd or settings.scan.spam):
            return
        self.scanning = build_scanning(settings.scan, settings.hostname, self.reactor)
        if old is not None:
            old.close()                 # its kept connections; scans under way finish
        self.start()

    def wants(self, tx: Transaction) -> bool:
        return self.scanning is not None

    def check(self, tx: Transaction, message: bytes) -> CheckOutcome | Deferred:
        scanning = self.scanning
        if scanning is None:                   # switched off by a reload since DATA
            return accept()
        d = scanning.check(message, trusted=tx.trusted, client_ip=tx.client_ip,
                           helo=tx.helo or None, sender=tx.sender,
                           recipients=tx.recipients)
        return d.addCallback(self._outcome)

    def _outcome(self, verdict: Verdict) -> CheckOutcome:
        clean = self._clean
        if clean is not None and clean[0] is verdict:    # policy's shared clean verdict
            return clean[1]
        outcome = check_outcome(verdict)
        if verdict.outcome is Outcome.ACCEPT:
            self._clean = (verdict, outcome)
        return outcome
