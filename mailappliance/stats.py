"""Counters in `app.stats` that `mailappliance stat` shows (a plain dict, reactor thread only).

Keys (documented in docs/ARCHITECTURE.md):

    connections.<kind>.now     connections open right now on the listeners of <kind>
                               (smtp, submission, submissions, pop3, pop3s, admin)
    connections.<kind>.total   connections accepted since start
    last_errors                collections.deque of the latest warning/error log lines
                               (filled by mailappliance.logging)
    config_loaded              time.time() of the last successful (re)load of the config
    logins.failed.<protocol>   failed logins since start, smtp (AUTH) and pop3: counted by
                               FailedLogins from the very log events fail2ban reads

A protocol calls `connection_opened(app.stats, kind)` in connectionMade and
`connection_closed(app.stats, kind)` in connectionLost; `stat` shows 0 for a kind that has had
no connection yet.
"""

from __future__ import annotations

from typing import MutableMapping


def _keys(kind: str) -> tuple[str, str]:
    return f"connections.{kind}.now", f"connections.{kind}.total"


def connection_opened(stats: MutableMapping, kind: str) -> None:
    now, total = _keys(kind)
    stats[now] = stats.get(now, 0) + 1
    stats[total] = stats.get(total, 0) + 1


def connection_closed(stats: MutableMapping, kind: str) -> None:
    now, _ = _keys(kind)
    stats[now] = max(0, stats.get(now, 0) - 1)


# Log formats whose events are failed logins (smtp/submission.py, pop3/protocol.py): the lines
# conf/fail2ban's filter matches.
FAILED_LOGIN_FORMATS = {"auth failed: ": "smtp", "login failed: ": "pop3"}


class FailedLogins:
    """A log observer counting failed-login events per protocol into `stats` (service.py
    registers one for the server's life). `stat` and the metrics both read these counts, so
    they always agree with each other and with the lines fail2ban bans on."""

    def __init__(self, stats: MutableMapping) -> None:
        self.stats = stats
        for protocol in FAILED_LOGIN_FORMATS.values():
            stats.setdefault(f"logins.failed.{protocol}", 0)

    def __call__(self, event: dict) -> None:
        fmt = event.get("log_format")
        if type(fmt) is str and fmt[:6] in ("auth f", "login "):
            for prefix, protocol in FAILED_LOGIN_FORMATS.items():
                if fmt.startswith(prefix):
                    key = f"logins.failed.{protocol}"
                    self.stats[key] = self.stats.get(key, 0) + 1


def failed_logins(stats: MutableMapping) -> dict[str, int]:
    """{protocol: failed logins since start}, every protocol present (0 when none)."""
    return {protocol: stats.get(f"logins.failed.{protocol}", 0)
            for protocol in FAILED_LOGIN_FORMATS.values()}


def connections(stats: MutableMapping, kind: str) -> tuple[int | None, int | None]:
    """(now, total), or (None, None) if nothing counts connections of this kind."""
    now, total = _keys(kind)
    if total not in stats:
        return None, None
    return stats.get(now, 0), stats[total]


def oldest_age(now: float, oldest_birth: float | None) -> int:
    """Whole seconds since the oldest queued message arrived (0 with none): `stat`, `stat
    --json` and the metrics' queue age alike."""
    return max(0, int(now - oldest_birth)) if oldest_birth is not None else 0
