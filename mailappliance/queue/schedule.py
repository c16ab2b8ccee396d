"""qmail-send's retry schedule, as pure functions of time (no clock reads here).

Source: qmail-1.03 qmail-send.c::

    static datetime_sec nextretry(birth,c)
    {
     int n;
     if (birth > recent) n = 0;
     else n = squareroot(recent - birth); /* no need to add fuzz to recent */
     n += chanskip[c];
     return birth + n * n;
    }

with ``chanskip[] = { 10, 20 }`` for the local and remote channel.  So a local delivery is
retried about 100, 400, 900, ... seconds after the message was queued (the gaps grow
linearly), a remote one 400, 1600, 3600, ... seconds; every attempt sets the next from the
time it finished.

Lifetime (qmail control/queuelifetime, default 604800 s = 7 days): an attempt that starts
after ``birth + lifetime`` is the last one ("flagdying" in qmail-send); if it defers, the
recipient fails with qmail's text and the sender gets a bounce.  We clamp the next retry to
``birth + lifetime`` so there always is one attempt at the end of the lifetime (qmail could
otherwise wait up to one more interval before that last attempt).
"""

from __future__ import annotations

from math import isqrt

LOCAL, REMOTE = "local", "remote"

# qmail-send.c chanskip[]: local 10, remote 20 (seconds, under the square).
CHANSKIP = {LOCAL: 10, REMOTE: 20}

# qmail control/queuelifetime default: 604800 seconds.
DEFAULT_LIFETIME = 7 * 24 * 60 * 60

# qmail-send.c, appended to the last deferral's text when the message is too old.
TOO_LONG = "I'm not going to try again; this message has been in the queue too long."


def nextretry(birth: float, now: float, channel: str) -> float:
    """qmail's nextretry(birth, c): birth + (isqrt(now - birth) + chanskip[c])**2."""
    n = 0 if birth > now else isqrt(int(now - birth))
    n += CHANSKIP[channel]
    return birth + n * n


def is_dying(birth: float, attempt_start: float, lifetime: float) -> bool:
    """An attempt that started at or after the end of the lifetime is the last one."""
    return attempt_start >= birth + lifetime


def next_attempt(birth: float, now: float, channel: str, lifetime: float) -> float:
    """When to try again after a deferral at `now` (never past the end of the lifetime, never
    before `now`)."""
    return max(now, min(nextretry(birth, now, channel), birth + lifetime))
