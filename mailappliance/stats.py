"""Counters in `app.stats` that `mailappliance stat` shows (a plain dict, reactor thread only).

Keys (documented in docs/ARCHITECTURE.md):

    connections.<kind>.now     connections open right now on the listeners of <kind>
                               (smtp, submission, submissions, pop3, pop3s, admin)
    connections.<kind>.total   connections accepted since start
    last_errors                collections.deque of the latest warning/error log lines
                               (filled by mailappliance.logging)
    config_loaded              time.time() of the last successful (re)load of the config

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


def connections(stats: MutableMapping, kind: str) -> tuple[int | None, int | None]:
    """(now, total), or (None, None) if nothing counts connections of this kind."""
    now, total = _keys(kind)
    if total not in stats:
        return None, None
    return stats.get(now, 0), stats[total]
