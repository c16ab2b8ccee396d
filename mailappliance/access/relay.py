"""POP-before-SMTP relay grants (vchkpw --enable-roaming-users), keyed by client IP.

Expiry runs on a monotonic clock, so a wall-clock jump neither extends nor cuts a grant. The
table is persisted (as remaining seconds against the wall clock at save time) so a restart keeps
the grants that are still valid; the file is written atomically (tmp + fsync + rename).
Blocking file I/O is a few hundred bytes per login; callers on the reactor thread accept that.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

# Upper bound on remembered grants: a botnet logging in from many addresses cannot grow the
# table (or the file) without limit; the oldest grant is dropped first.
MAX_GRANTS = 100_000


def normalize_ip(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


class RelayGrants:
    def __init__(self, path: Path | None, clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        self.path = path
        self._clock = clock
        self._wallclock = wallclock
        self._on_change = on_change          # (event, ip): "grant" / "expire"
        self._expires: dict[str, float] = {}  # ip -> monotonic expiry
        if path is not None:
            self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            return   # a corrupt grant file only costs roaming users one more POP3 login
        saved_at = raw.get("saved_at", 0) if isinstance(raw, dict) else 0
        grants = raw.get("grants", {}) if isinstance(raw, dict) else {}
        now_wall, now = self._wallclock(), self._clock()
        elapsed = max(0.0, now_wall - float(saved_at))
        for ip, remaining in grants.items():
            if isinstance(ip, str) and isinstance(remaining, (int, float)):
                left = float(remaining) - elapsed
                if left > 0:
                    self._expires[normalize_ip(ip)] = now + left

    def _save(self) -> None:
        if self.path is None:
            return
        now = self._clock()
        payload = {"saved_at": self._wallclock(),
                   "grants": {ip: round(exp - now, 3) for ip, exp in self._expires.items()
                              if exp > now}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def grant(self, ip: str, seconds: float) -> None:
        if seconds <= 0:
            return
        ip = normalize_ip(ip)
        self._expire_old()
        self._expires.pop(ip, None)
        while len(self._expires) >= MAX_GRANTS:
            oldest = min(self._expires, key=self._expires.__getitem__)
            del self._expires[oldest]
        self._expires[ip] = self._clock() + seconds
        self._save()
        if self._on_change:
            self._on_change("grant", ip)

    def is_granted(self, ip: str) -> bool:
        ip = normalize_ip(ip)
        exp = self._expires.get(ip)
        if exp is None:
            return False
        if exp <= self._clock():
            del self._expires[ip]
            if self._on_change:
                self._on_change("expire", ip)
            return False
        return True

    def _expire_old(self) -> list[str]:
        now = self._clock()
        gone = [ip for ip, exp in self._expires.items() if exp <= now]
        for ip in gone:
            del self._expires[ip]
            if self._on_change:
                self._on_change("expire", ip)
        return gone

    def expire(self) -> list[str]:
        """Drop expired grants; returns their IPs (for the log)."""
        gone = self._expire_old()
        if gone:
            self._save()
        return gone

    def entries(self) -> Iterable[tuple[str, float]]:
        """(ip, seconds left) for every valid grant, soonest expiry first."""
        now = self._clock()
        return sorted(((ip, exp - now) for ip, exp in self._expires.items() if exp > now),
                      key=lambda e: e[1])
