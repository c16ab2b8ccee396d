"""Per-client-IP login penalty, like Dovecot's auth penalty; a pure core (time comes in).

Shared by every password check of one server (POP3 USER/PASS and APOP, SMTP AUTH): an address
guessing passwords is one client whichever protocol or port it uses (one table per server:
`App.login_penalty`).

Each failed login from an address raises its penalty one step: the failure is answered after
2, 4, 8, then 15 seconds, and a further check from that address (another connection, say)
does not start before the last failure's answer was due. A success clears the address; an
address with no failure for PENALTY_TIMEOUT seconds starts again from zero. The adapter waits
with reactor.callLater, so a penalised client never holds up anybody else.

Checks from one address take turns (`begin_check` / `end_check`, docs/LIMITS.md): one check
per address at a time, the next one starting when the last one ended and its penalty is over.
Without turns every connection waiting for the same penalty wakes at the same moment and checks
at once, so ten parallel connections got ten times the guesses of one (issue 18: 20 checks in
20 s where one connection gets 4-6). With them an address gets the guesses of one connection
however many it opens: at most 4 in its first 20 s, then one per 15 s (and the bcrypt time),
about 4 a minute. The queue of waiting checks is bounded by the connections the listeners admit.
The adapter's side is access/checkslot.py.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

# Dovecot src/auth/auth-penalty.h: AUTH_PENALTY_INIT_SECS 2, AUTH_PENALTY_MAX_SECS 15,
# AUTH_PENALTY_MAX_PENALTY 4 (2, 4, 8, 15), and AUTH_PENALTY_TIMEOUT = 2 + 4 + 8 + 15 seconds
# after which a penalty is irrelevant.
PENALTY_INIT = 2.0
PENALTY_MAX = 15.0
PENALTY_MAX_STEPS = 4
PENALTY_TIMEOUT = PENALTY_INIT + 4 + 8 + PENALTY_MAX
# Dovecot auth-penalty.c PENALTY_IPV6_MASK_BITS: one IPv6 host owns far more than one address,
# so penalties are kept per /48 or it could step around them.
IPV6_MASK_BITS = 48
# Memory bound: addresses remembered at most; the least recently failed is forgotten first.
MAX_TRACKED = 65536


def penalty_seconds(steps: int) -> float:
    if steps <= 0:
        return 0.0
    return min(PENALTY_INIT * (2 ** (min(steps, PENALTY_MAX_STEPS) - 1)), PENALTY_MAX)


def penalty_key(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/{IPV6_MASK_BITS}", strict=False))
    return str(addr)


@dataclass
class _Record:
    steps: int
    last_failure: float
    not_before: float
    holder: Any = None          # the check that has the address's turn (an adapter's token)
    waiting: deque = field(default_factory=deque)     # tokens of the checks queued behind it

    @property
    def busy(self) -> bool:
        return self.holder is not None or bool(self.waiting)


class LoginPenalty:
    def __init__(self, max_tracked: int = MAX_TRACKED) -> None:
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._max = max_tracked

    def _get(self, key: str, now: float) -> _Record | None:
        rec = self._records.get(key)
        if rec is not None and now - rec.last_failure >= PENALTY_TIMEOUT and now >= rec.not_before:
            if rec.busy:
                rec.steps = 0           # the penalty is over; the turns are not
            else:
                del self._records[key]
                return None
        return rec

    def _add(self, key: str, now: float) -> _Record:
        rec = self._records[key] = _Record(0, now, now)
        if len(self._records) > self._max:
            # The least recently failed goes first; an address with checks in progress or
            # queued stays (those are bounded by the connections the listeners admit).
            excess = len(self._records) - self._max
            doomed = []
            for old, r in self._records.items():
                if len(doomed) >= excess:
                    break
                if old != key and not r.busy:
                    doomed.append(old)
            for old in doomed:
                del self._records[old]
        return rec

    # --- turns: one check per address at a time ---------------------------------------------

    def begin_check(self, ip: str, now: float, token: Any) -> float | None:
        """A check from `ip` (identified by `token`) asks for the address's turn. Returns the
        seconds to wait before checking (0.0: at once) when the turn is its own; None when
        another check has it: the token is queued, and handed the turn later by end_check or
        cancel (their return value)."""
        key = penalty_key(ip)
        rec = self._get(key, now)
        if rec is None:
            rec = self._add(key, now)
        if rec.holder is not None:
            rec.waiting.append(token)
            return None
        rec.holder = token
        return max(0.0, rec.not_before - now)

    def end_check(self, ip: str, now: float, ok: bool | None
                  ) -> tuple[float, tuple[Any, float] | None]:
        """The check holding `ip`'s turn is over: `ok` True (success: the penalty is cleared),
        False (failure: one step more), None (no verdict: the user store failed). Returns the
        seconds to wait before answering the failure, and the queued check that has the turn
        now with the seconds it waits first (or None)."""
        key = penalty_key(ip)
        delay = 0.0
        if ok is False:
            delay = self.failed(ip, now)
        rec = self._records.get(key)
        if rec is None:
            return delay, None
        if ok is True:
            rec.steps = 0
            rec.not_before = min(rec.not_before, now)
        rec.holder = None
        nxt = self._hand_over(rec, now)
        if ok is True and not rec.busy:
            del self._records[key]
        return delay, nxt

    def cancel(self, ip: str, now: float, token: Any) -> tuple[Any, float] | None:
        """The check `token` is abandoned before it ran (its connection went away): it leaves
        the queue, or gives its turn to the next check (returned, as from end_check)."""
        rec = self._records.get(penalty_key(ip))
        if rec is None:
            return None
        if rec.holder is token:
            rec.holder = None
            return self._hand_over(rec, now)
        try:
            rec.waiting.remove(token)
        except ValueError:
            pass
        return None

    @staticmethod
    def _hand_over(rec: _Record, now: float) -> tuple[Any, float] | None:
        if rec.holder is not None or not rec.waiting:
            return None
        rec.holder = rec.waiting.popleft()
        return rec.holder, max(0.0, rec.not_before - now)

    def waiting(self, ip: str) -> int:
        """Checks from `ip` queued behind the one that has its turn."""
        rec = self._records.get(penalty_key(ip))
        return 0 if rec is None else len(rec.waiting)

    def wait_before_check(self, ip: str, now: float) -> float:
        """Seconds to wait before checking a password from `ip` (0 when it has no penalty)."""
        rec = self._get(penalty_key(ip), now)
        return 0.0 if rec is None else max(0.0, rec.not_before - now)

    def failed(self, ip: str, now: float) -> float:
        """Record a failed login; returns the seconds to wait before answering it."""
        key = penalty_key(ip)
        rec = self._get(key, now)
        if rec is None:
            rec = self._add(key, now)
        rec.steps = min(rec.steps + 1, PENALTY_MAX_STEPS)
        rec.last_failure = now
        delay = penalty_seconds(rec.steps)
        rec.not_before = max(rec.not_before, now + delay)
        self._records.move_to_end(key)
        return delay

    def succeeded(self, ip: str) -> None:
        key = penalty_key(ip)
        rec = self._records.get(key)
        if rec is None:
            return
        if rec.busy:
            rec.steps = 0
        else:
            del self._records[key]

    def steps(self, ip: str, now: float) -> int:
        rec = self._get(penalty_key(ip), now)
        return 0 if rec is None else rec.steps

    def __len__(self) -> int:
        return len(self._records)
