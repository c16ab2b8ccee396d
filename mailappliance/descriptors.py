"""File descriptors: what the process may open, what it keeps back for its own files, and each
network listener's share of the rest (docs/LIMITS.md). Pure arithmetic on the settings and one
getrlimit/setrlimit at start; no Twisted.

Every inbound connection is one descriptor. When they run out, accept() fails with EMFILE, and
so do the queue's files, the Maildir writes, the log, SQLite and DNS: a flood on one port would
stop everything (issue 18: 300 POP3 connections took all 256 descriptors; SMTP from another
address got no greeting). So:

- At start the soft RLIMIT_NOFILE is raised to the hard limit (what systemd's LimitNOFILE sets:
  4096 in conf/mailappliance.service), as nginx's worker_rlimit_nofile and Dovecot do.
- A reserve is kept back for the server's own files: RESERVE_BASE for what every server holds
  (listening sockets, log files, SQLite and its WAL per pool thread, DNS sockets, the queue's
  directories), the admin connections, the inject socket's sessions and the metrics scrapes
  when those listeners are on (each has a fixed bound of its own), and RESERVE_PER_DELIVERY
  per local and remote delivery slot.
- What is left is shared by the network listeners (smtp, submission, submissions, pop3, pop3s:
  one share per endpoint). When the configured max_connections of all of them fit, each gets
  its own; when they do not, each gets the same fraction of its own, so a flood on one service
  can take its share and never the others'. A connection past its share gets a clear refusal
  (SMTP 421, POP3 -ERR [SYS/TEMP]) instead of EMFILE.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Descriptors every running server holds besides its connections and deliveries: 8 listener
# kinds (a few endpoints each), the log file and its rotation, users.sqlite with -wal and -shm
# per pool thread (10 threads), the queue's open directories, the DNS socket pool, the epoll
# and waker descriptors. Counted on a running server (ls /proc/PID/fd): about 40 with the
# default configuration; 64 leaves room.
RESERVE_BASE = 64
# The inject socket's sessions ([listen] inject): at most this many at once (pickup/service.py's
# MAX_CONNECTIONS is this number), each holding its socket and the queue file it writes.
INJECT_SESSIONS = 32
INJECT_DESCRIPTORS_PER_SESSION = 2
# Scrapes of [listen] metrics at once (metrics.py refuses more with 503): Prometheus scrapes a
# target one request at a time, so 8 leaves room for an HA pair, a second Prometheus and a
# person with curl, and a flood of the metrics port from a local user stays within this.
METRICS_MAX_CONNECTIONS = 8
# A local delivery holds the queue file and a Maildir tmp/ file (and a directory during the
# rename); a remote one the queue file, its socket and a DNS socket: three each.
RESERVE_PER_DELIVERY = 3
# The listeners that share what is left, each with its [section] of max_connections.
NETWORK_KINDS = ("smtp", "submission", "submissions", "pop3", "pop3s")


def section_of(kind: str) -> str:
    return {"smtp": "smtp", "submission": "submission", "submissions": "submission",
            "pop3": "pop3", "pop3s": "pop3"}[kind]


def configured_max(settings, kind: str) -> int:
    return getattr(settings, section_of(kind)).max_connections


def reserve_for(settings) -> int:
    queue = settings.queue
    inject = INJECT_SESSIONS * INJECT_DESCRIPTORS_PER_SESSION if settings.listen.inject else 0
    metrics = METRICS_MAX_CONNECTIONS if settings.listen.metrics else 0
    return (RESERVE_BASE + settings.admin.max_connections + inject + metrics
            + RESERVE_PER_DELIVERY * (queue.concurrency_local + queue.concurrency_remote))


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    elif hard == resource.RLIM_INFINITY and soft == resource.RLIM_INFINITY:
        return 1 << 20
    return soft


@dataclass(frozen=True)
class Plan:
    limit: int                     # RLIMIT_NOFILE in force
    reserve: int                   # kept back for the server's own files
    wanted: int                    # network connections the settings allow, all endpoints
    shares: dict                   # kind -> connections per endpoint of that kind
    endpoints: dict                # kind -> its network endpoints in the settings

    @property
    def fits(self) -> bool:
        return self.wanted + self.reserve <= self.limit


def plan(settings, limit: int) -> Plan:
    """Each network listener's share (per endpoint) of `limit` descriptors under `settings`."""
    reserve = reserve_for(settings)
    counts = {kind: len([d for d in getattr(settings.listen, kind) if not d.startswith("unix:")])
              for kind in NETWORK_KINDS}
    wanted = sum(counts[k] * configured_max(settings, k) for k in NETWORK_KINDS)
    available = max(0, limit - reserve)
    shares = {}
    for kind in NETWORK_KINDS:
        m = configured_max(settings, kind)
        shares[kind] = m if wanted <= available else (m * available) // wanted
    return Plan(limit, reserve, wanted, shares, counts)


class DescriptorBudget:
    """The process's descriptor plan, recomputed when the settings change (a reload)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = raise_soft_limit() if limit is None else limit
        self._settings = None
        self._plan: Plan | None = None

    def plan(self, settings) -> Plan:
        if settings is not self._settings:
            self._plan = plan(settings, self.limit)
            self._settings = settings
        return self._plan

    def share(self, settings, kind: str) -> int:
        """Connections one endpoint of `kind` may hold at once."""
        return self.plan(settings).shares.get(kind, configured_max(settings, kind))


def describe_plan(p: Plan) -> str:
    """The start-up log line: the limit, the reserve, and the shares when they are cut."""
    text = (f"descriptors: limit {p.limit}, reserve {p.reserve}, network connections "
            f"{p.wanted} configured")
    if p.fits:
        return text
    cut = ", ".join(f"{k} {n}" for k, n in p.shares.items() if p.endpoints[k])
    return (f"{text}: more than the limit leaves; each endpoint gets this many instead: {cut} "
            f"(raise LimitNOFILE or lower max_connections)")
