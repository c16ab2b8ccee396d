"""Per-client-IP login penalty, like Dovecot's auth penalty; a pure core (time comes in).

Shared by every password check of one server (POP3 USER/PASS and APOP, SMTP AUTH): an address
guessing passwords is one client whichever protocol or port it uses (one table per server:
`App.login_penalty`).

Each failed login from an address raises its penalty one step: the failure is answered after
2, 4, 8, then 15 seconds, and a further check from that address (another connection, say)
does not start before the last failure's answer was due. A success clears the address; an
address with no failure for PENALTY_TIMEOUT seconds starts again from zero. The adapter waits
with reactor.callLater, so a penalised client never holds up anybody else.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

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


class LoginPenalty:
    def __init__(self, max_tracked: int = MAX_TRACKED) -> None:
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._max = max_tracked

    def _get(self, key: str, now: float) -> _Record | None:
        rec = self._records.get(key)
        if rec is not None and now - rec.last_failure >= PENALTY_TIMEOUT and now >= rec.not_before:
            del self._records[key]
            return None
        return rec

    def wait_before_check(self, ip: str, now: float) -> float:
        """Seconds to wait before checking a password from `ip` (0 when it has no penalty)."""
        rec = self._get(penalty_key(ip), now)
        return 0.0 if rec is None else max(0.0, rec.not_before - now)

    def failed(self, ip: str, now: float) -> float:
        """Record a failed login; returns the seconds to wait before answering it."""
        key = penalty_key(ip)
        rec = self._get(key, now)
        if rec is None:
            rec = _Record(0, now, now)
            self._records[key] = rec
            while len(self._records) > self._max:
                self._records.popitem(last=False)
        rec.steps = min(rec.steps + 1, PENALTY_MAX_STEPS)
        rec.last_failure = now
        delay = penalty_seconds(rec.steps)
        rec.not_before = max(rec.not_before, now + delay)
        self._records.move_to_end(key)
        return delay

    def succeeded(self, ip: str) -> None:
        self._records.pop(penalty_key(ip), None)

    def steps(self, ip: str, now: float) -> int:
        rec = self._get(penalty_key(ip), now)
        return 0 if rec is None else rec.steps

    def __len__(self) -> int:
        return len(self._records)
