"""Texts of `stat`, `queue list` and `relay list`: pure functions of snapshots and a time.

The wording follows qmailctl stat and qmail-qread where they have one ("messages in queue:",
"messages in queue but not yet preprocessed:", "status: local l/L remote r/R").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence


def duration(seconds: float) -> str:
    """Compact age: 45s, 3m05s, 2h03m, 4d02h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass(frozen=True)
class ServiceStatus:
    kind: str
    addresses: tuple[str, ...]
    started_at: float | None
    connections_now: int | None = None      # None: the service does not count connections
    connections_total: int | None = None


@dataclass(frozen=True)
class QueueStatus:
    messages: int
    unprocessed: int
    local_busy: int
    local_max: int
    remote_busy: int
    remote_max: int


@dataclass(frozen=True)
class StatSnapshot:
    hostname: str
    pid: int
    started: float
    services: tuple[ServiceStatus, ...]
    queue: QueueStatus | None
    queue_why: str = ""                      # why queue is None
    last_errors: tuple[str, ...] = ()
    config_path: str | None = None
    config_loaded: float | None = None
    rules: str | None = None                 # "N rules from FILE" or None
    extra: tuple[str, ...] = field(default_factory=tuple)
    counters: dict = field(default_factory=dict)   # stat_counters(): what `extra` says, as numbers


def format_stat(s: StatSnapshot, now: float) -> list[str]:
    lines = [f"mailappliance: up (pid {s.pid}) {int(now - s.started)} seconds, "
             f"hostname {s.hostname}"]
    config = s.config_path or "embedded defaults"
    if s.config_loaded is not None:
        config += f", loaded {int(now - s.config_loaded)} seconds ago"
    lines.append(f"config: {config}")
    lines.append(f"rules: {s.rules or 'none (nobody relays by IP)'}")
    for svc in s.services:
        up = ("up " + f"{int(now - svc.started_at)} seconds") if svc.started_at else "down"
        where = " ".join(svc.addresses) or "-"
        conns = f"connections {svc.connections_now or 0} now, {svc.connections_total or 0} total"
        lines.append(f"{svc.kind}: {up}, listening on {where}; {conns}")
    if s.queue is None:
        lines.append(f"queue: {s.queue_why or 'not running'}")
    else:
        q = s.queue
        lines.append(f"messages in queue: {q.messages}")
        lines.append(f"messages in queue but not yet preprocessed: {q.unprocessed}")
        lines.append(f"status: local {q.local_busy}/{q.local_max} "
                     f"remote {q.remote_busy}/{q.remote_max}")
    lines.extend(s.extra)
    if s.last_errors:
        lines.append(f"last errors ({len(s.last_errors)}, newest last):")
        lines.extend(f"  {e}" for e in s.last_errors)
    else:
        lines.append("last errors: none")
    return lines


# A string in `stat --json` is cut to this many characters: the admin protocol carries the
# document one line per value, and cuts reply lines at protocol.MAX_REPLY_LINE (4096).
JSON_STRING_MAX = 2000


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= JSON_STRING_MAX:
        return text
    return text[:JSON_STRING_MAX] + "..."


def stat_json(s: StatSnapshot, now: float) -> dict:
    """`stat --json`: the same facts as format_stat, as numbers (documented in
    docs/MONITORING.md)."""
    return {
        "hostname": s.hostname,
        "pid": s.pid,
        "uptime_seconds": int(now - s.started),
        "config": {"path": s.config_path,
                   "loaded_seconds_ago": None if s.config_loaded is None
                   else int(now - s.config_loaded)},
        "rules": s.rules,
        "services": [{"kind": svc.kind, "addresses": list(svc.addresses),
                      "up_seconds": int(now - svc.started_at) if svc.started_at else None,
                      "connections_now": svc.connections_now or 0,
                      "connections_total": svc.connections_total or 0}
                     for svc in s.services],
        "queue": asdict(s.queue) if s.queue is not None else None,
        "queue_why": s.queue_why or None,
        "counters": s.counters,
        "last_errors": [_cut(e) for e in s.last_errors],
    }


def stat_counters(injector: dict | None, manager: dict | None, resolver: dict | None) -> dict:
    """Counters since start, by component, for `stat --json` and the metrics endpoint."""
    out: dict = {}
    if injector is not None:
        out["queue"] = {"commits": injector.get("commits", 0),
                        "group_commits": injector.get("dir_syncs", 0),
                        "write_errors": injector.get("write_errors", 0)}
    if manager is not None:
        out["deliveries"] = {k: manager.get(k, 0) for k in
                             ("success", "deferral", "failure", "bounces", "double_bounces",
                              "triple_bounces")}
    if resolver is not None:
        out["dns"] = {"lookups": resolver.get("queries", 0),
                      "cache_hits": resolver.get("cache_hits", 0),
                      "timeouts": resolver.get("timeouts", 0),
                      "failures": resolver.get("failures", 0)}
    return out


def counter_lines(injector: dict | None, manager: dict | None, resolver: dict | None) -> list[str]:
    """Counters since start for `stat`: queue commits and their group fsyncs, delivery
    results, DNS lookups. Each argument is the component's `stats` dict, or None without it."""
    lines = []
    if injector is not None:
        commits, syncs = injector.get("commits", 0), injector.get("dir_syncs", 0)
        per = f", {commits / syncs:.1f} per directory fsync" if syncs else ""
        lines.append(f"queue since start: {commits} messages committed in {syncs} group "
                     f"commits{per}, {injector.get('write_errors', 0)} write errors")
    if manager is not None:
        lines.append(f"deliveries since start: {manager.get('success', 0)} success, "
                     f"{manager.get('deferral', 0)} deferral, {manager.get('failure', 0)} "
                     f"failure; {manager.get('bounces', 0)} bounces")
    if resolver is not None:
        lines.append(f"dns since start: {resolver.get('queries', 0)} lookups, "
                     f"{resolver.get('cache_hits', 0)} from cache, "
                     f"{resolver.get('timeouts', 0)} timeouts, "
                     f"{resolver.get('failures', 0)} failed")
    return lines


_STATE_WORDS = {"todo": "todo", "done": "done", "failed": "failed"}


def format_queue(entries: Iterable, now: float, limit: int) -> list[str]:
    """qmail-qread for our queue: one line per message, one indented line per recipient.

    `entries` are queue/store.py QueueEntry objects (qid, birth, size, sender, recipients as
    (address, state), next_try)."""
    lines: list[str] = []
    count = 0
    shown = 0
    for e in entries:
        count += 1
        if shown >= limit:
            continue
        shown += 1
        when = time.strftime("%d %b %Y %H:%M:%S GMT", time.gmtime(e.birth))
        if e.next_try and e.next_try > now:
            nxt = f"next try in {duration(e.next_try - now)}"
        else:
            nxt = "next try now"
        lines.append(f"{e.qid}  {when}  age {duration(now - e.birth)}  {e.size} bytes  "
                     f"from <{e.sender}>  {nxt}")
        for address, state in e.recipients:
            lines.append(f"  {_STATE_WORDS.get(state, state)}  {address}")
    if count > shown:
        lines.append(f"... {count - shown} more messages not shown")
    lines.append(f"{count} messages")
    return lines


def format_grants(entries: Sequence[tuple[str, float]]) -> list[str]:
    lines = [f"{ip}  expires in {duration(left)}" for ip, left in entries]
    lines.append(f"{len(entries)} grants")
    return lines
