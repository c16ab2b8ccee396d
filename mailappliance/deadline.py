"""Deadlines a peer cannot stretch: per request and per session (docs/LIMITS.md). A pure core:
time comes in as arguments; the protocols keep one lazy timer that asks `expired(now)`.

qmail's timeouts (and ours before issue 18) are per read: every byte restarts the clock, so a
client sending one byte a second holds its connection slot forever and never finishes a line.
Postfix's smtpd_per_request_deadline (Postfix 3.7) turns smtpd_timeout into "a combined time
limit for sending a complete SMTP response and receiving a complete SMTP request", and
smtpd_min_data_rate lets message content earn more time only as fast as it arrives. We do the
same:

- A request (a command line) must be complete within `timeout` seconds ([smtp] timeout,
  [pop3] timeout) of the moment the server finished the previous one: bytes that do not end a
  line earn nothing.
- Message content (SMTP DATA) and streamed output (POP3 RETR, replies a slow reader drains)
  earn 1 second per MIN_DATA_RATE bytes on top, never more than `timeout` ahead of now: a
  transfer that keeps moving at least that fast is never cut off, a trickle is.
- A whole session ends `lifetime` seconds after it began, whatever it does.
"""

from __future__ import annotations

# Postfix's smtpd_min_data_rate default (bytes per second): content slower than this does not
# keep a session alive. 500 B/s is a 300 baud modem's rate times 13; no real link is slower.
MIN_DATA_RATE = 500
# An SMTP session lasts at most an hour. Postfix's client reuses a connection for at most
# 300 s (smtp_connection_reuse_time_limit), qmail-remote opens one per message, so no real
# sender needs more; a 10 MiB message (databytes' default) fits at 3 KB/s. A session cut
# off gets 451 and retries later: nothing acknowledged is lost.
SMTP_SESSION_LIFETIME = 3600
# A POP3 session lasts at most four hours: a 2 GiB mailbox at 150 KB/s. A session cut off
# before QUIT deletes nothing (RFC 1939 section 6), so a client loses no mail, only time.
POP3_SESSION_LIFETIME = 4 * 3600


class Deadline:
    """One session's request deadline and lifetime."""

    __slots__ = ("timeout", "expires", "ends", "min_rate")

    def __init__(self, timeout: float, now: float, lifetime: float,
                 min_rate: float = MIN_DATA_RATE) -> None:
        self.timeout = timeout
        self.expires = now + timeout          # the current request's deadline
        self.ends = now + lifetime            # the session's
        self.min_rate = min_rate

    def request_done(self, now: float, timeout: float | None = None) -> None:
        """A request was complete: the next one gets `timeout` (the settings in force)."""
        if timeout is not None:
            self.timeout = timeout
        self.expires = now + self.timeout

    def moved(self, now: float, nbytes: int) -> None:
        """Content moved (in or out): `nbytes` earn nbytes/min_rate seconds, capped."""
        self.expires = min(self.expires + nbytes / self.min_rate, now + self.timeout)

    def expired(self, now: float) -> bool:
        return now >= self.expires or now >= self.ends

    def over_lifetime(self, now: float) -> bool:
        return now >= self.ends

    def remaining(self, now: float) -> float:
        return max(0.0, min(self.expires, self.ends) - now)
