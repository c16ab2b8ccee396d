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
    # Seconds since the oldest message the queue manager holds arrived; None: it holds none.
    oldest_age_seconds: int | None = None
    # The manager's active window (messages in memory, its limit), the backlog (messages
    # known as 24-byte entries), whether the queue is still being loaded, dead destinations.
    in_memory: int | None = None
    memory_limit: int | None = None
    backlog: int | None = None
    loading: bool = False
    dead: tuple[str, ...] = ()


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
    # The user directory this node uses ([users] database; a URI without its password) and
    # its mailbox tree: several nodes share both (docs/SEVERAL_NODES.md).
    database: str | None = None
    mailboxes: str | None = None


def format_stat(s: StatSnapshot, now: float) -> list[str]:
    lines = [f"mailappliance: up (pid {s.pid}) {int(now - s.started)} seconds, "
             f"hostname {s.hostname}"]
    config = s.config_path or "embedded defaults"
    if s.config_loaded is not None:
        config += f", loaded {int(now - s.config_loaded)} seconds ago"
    lines.append(f"config: {config}")
    lines.append(f"rules: {s.rules or 'none (nobody relays by IP)'}")
    if s.database is not None:
        lines.append(f"users: {s.database}, mailboxes {s.mailboxes or '-'}")
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
        if q.oldest_age_seconds is not None:
            lines.append(f"oldest message in queue: {q.oldest_age_seconds} seconds")
        if q.in_memory is not None:
            lines.append(f"messages in memory: {q.in_memory} of at most {q.memory_limit}; "
                         f"in the backlog: {q.backlog}"
                         + ("; still loading the queue" if q.loading else ""))
        if q.dead:
            lines.append(f"dead destinations ({len(q.dead)}): " + " ".join(q.dead[:20])
                         + (" ..." if len(q.dead) > 20 else ""))
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
        "database": s.database,
        "mailboxes": s.mailboxes,
        "services": [{"kind": svc.kind, "addresses": list(svc.addresses),
                      "up_seconds": int(now - svc.started_at) if svc.started_at else None,
                      "connections_now": svc.connections_now or 0,
                      "connections_total": svc.connections_total or 0}
                     for svc in s.services],
        "queue": dict(asdict(s.queue), dead=list(s.queue.dead)) if s.queue is not None
        else None,
        "queue_why": s.queue_why or None,
        "counters": s.counters,
        "last_errors": [_cut(e) for e in s.last_errors],
    }


def stat_counters(injector: dict | None, manager: dict | None, resolver: dict | None,
                  logins: dict | None = None, tls_handshakes: int | None = None,
                  dnsbl: dict | None = None) -> dict:
    """Counters since start, by component, for `stat --json` (the metrics endpoint reads the
    same counters). `logins` is stats.failed_logins(); `tls_handshakes` the TLS context's
    count of completed server handshakes; `dnsbl` the DNSBL checker's stats."""
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
    if logins is not None:
        out["failed_logins"] = dict(logins)
    if tls_handshakes is not None:
        out["tls"] = {"handshakes": tls_handshakes}
    if dnsbl is not None:
        out["dnsbl"] = {k: dnsbl.get(k, 0) for k in ("checks", "refusals", "timeouts")}
    return out


def counter_lines(injector: dict | None, manager: dict | None, resolver: dict | None,
                  logins: dict | None = None, tls_handshakes: int | None = None,
                  dnsbl: dict | None = None) -> list[str]:
    """Counters since start for `stat`: queue commits and their group fsyncs, delivery
    results, DNS lookups, failed logins, TLS handshakes. Each of the first three is the
    component's `stats` dict, or None without it."""
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
    if logins is not None:
        lines.append("failed logins since start: " + ", ".join(
            f"{n} {protocol}" for protocol, n in logins.items()))
    if tls_handshakes is not None:
        lines.append(f"tls handshakes since start: {tls_handshakes}")
    if dnsbl is not None:
        lines.append(f"dnsbl since start: {dnsbl.get('checks', 0)} clients checked, "
                     f"{dnsbl.get('refusals', 0)} refused, {dnsbl.get('timeouts', 0)} "
                     "lookups cut at dnsbl_timeout")
    return lines


def recipient_state(info, delivering: bool) -> str:
    """What `queue list` calls a recipient: queued (not tried yet), deferred (tried, waiting
    for its next try), delivering (an attempt in flight), done, failed (bounce pending)."""
    if info.state == "todo":
        if delivering:
            return "delivering"
        return "deferred" if info.attempts else "queued"
    return info.state


def _when(t: float | None, now: float) -> str:
    return "-" if t is None else f"{duration(now - t)} ago"


def _one_line(text: str) -> str:
    return " / ".join(part.strip() for part in text.splitlines() if part.strip())


def format_queue_page(entries: Iterable, now: float, total: int, more: int,
                      delivering: dict | None = None,
                      max_lines: int = 10_000) -> list[str]:
    """`queue list`: per message a line (its log id, arrival, age, size, sender, next try),
    per recipient a line (state, address, attempts and when the last was), and for a
    deferred or failed recipient the text of its last error (remote host and its reply, or
    the connect error). Stops before `max_lines`; the last lines say how many messages there
    are and how to get the next page."""
    delivering = delivering or {}
    lines: list[str] = []
    last_qid = None
    shown = 0
    entries = list(entries)
    for e in entries:
        block = []
        when = time.strftime("%d %b %Y %H:%M:%S GMT", time.gmtime(e.birth))
        if e.next_try and e.next_try > now:
            nxt = f"next try in {duration(e.next_try - now)}"
        else:
            nxt = "next try now"
        block.append(f"{e.name or e.qid}  {when}  age {duration(now - e.birth)}  {e.size} bytes"
                     f"  from <{e.sender}>  {nxt}")
        busy = delivering.get(e.qid, frozenset())
        for r in e.details:
            state = recipient_state(r, r.index in busy)
            tries = f"  attempts {r.attempts}, last {_when(r.last_try, now)}" if r.attempts else ""
            block.append(f"  {state}  {r.address}{tries}")
            if r.state == "failed" and r.failure:
                block.append(f"      error: {_one_line(r.failure)}")
            elif r.state == "todo" and r.last_error:
                block.append(f"      last error: {_one_line(r.last_error)}")
        if lines and len(lines) + len(block) + 2 > max_lines:
            break
        lines.extend(block)
        last_qid = e.qid
        shown += 1
    more += len(entries) - shown
    if more:
        lines.append(f"... {more} more messages: queue list --after {last_qid}")
    lines.append(f"{total} messages")
    return lines


def queue_json_lines(entries: Iterable, now: float, total: int, more: int,
                     delivering: dict | None = None) -> list[str]:
    """`queue list --json` on the wire: one JSON object per recipient (so no line grows with
    the number of recipients), then {"total", "more", "next_after"}; the command groups them
    into one object per message (docs/MONITORING.md)."""
    import json
    delivering = delivering or {}
    out = []
    last = None
    for e in entries:
        busy = delivering.get(e.qid, frozenset())
        for r in e.details:
            out.append(json.dumps({
                "id": e.name or str(e.qid), "queue_id": e.qid, "arrival": e.birth,
                "size": e.size, "sender": e.sender, "next_try": e.next_try or None,
                "received_from": _cut(e.received_from),
                "address": r.address, "state": recipient_state(r, r.index in busy),
                "attempts": r.attempts, "last_try": r.last_try,
                "last_error": _cut(r.failure if r.state == "failed" else r.last_error)},
                ensure_ascii=True))
        last = e.qid
    out.append(json.dumps({"total": total, "more": more,
                           "next_after": last if more else None}))
    return out


def format_show(e, now: float, header: bytes, delivering: frozenset = frozenset()) -> list[str]:
    """`queue show ID` (postcat -q): envelope, each recipient's state, the header."""
    lines = [f"id: {e.name or e.qid}",
             f"queue file: mess/{e.qid}",
             f"arrival: {time.strftime('%d %b %Y %H:%M:%S GMT', time.gmtime(e.birth))} "
             f"(age {duration(now - e.birth)})",
             f"size: {e.size} bytes",
             f"sender: <{e.sender}>",
             f"received from: {e.received_from or '-'}",
             "next try: " + (f"in {duration(e.next_try - now)}" if e.next_try and e.next_try > now
                             else "now"),
             "recipients:"]
    for r in e.details:
        state = recipient_state(r, r.index in delivering)
        tries = f"  attempts {r.attempts}, last {_when(r.last_try, now)}" if r.attempts else ""
        lines.append(f"  {state}  {r.address}{tries}")
        if r.state == "failed" and r.failure:
            lines.append(f"      error: {_one_line(r.failure)}")
        elif r.state == "todo" and r.last_error:
            lines.append(f"      last error: {_one_line(r.last_error)}")
    lines.append("header:")
    text = header.decode("utf-8", "replace")
    lines.extend("  " + line for line in text.splitlines())
    return lines


def format_grants(entries: Sequence[tuple[str, float]]) -> list[str]:
    lines = [f"{ip}  expires in {duration(left)}" for ip, left in entries]
    lines.append(f"{len(entries)} grants")
    return lines
