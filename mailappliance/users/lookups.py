"""The directory and the grants as the reactor thread may ask them: never waiting on a network.

SMTP asks for every RCPT (recipient, domain, roaming grant) on the reactor thread. With the
embedded SQLite store that is a cached dictionary hit or a local query of tens of
microseconds, and stays a direct call, as before (smtp/protocol.py says why a thread pool
would cost more). With PostgreSQL a cache miss is a network round trip, and a database that
is down could hold it for seconds; so a miss goes to a thread and the answer comes back as
a Deferred (the SMTP core already waits on Deferred replies, as for DNSBL verdicts).
Concurrent misses of one key share one query.

Each method returns the answer itself when it has it at once, else a Deferred; a failure
(OSError, `DirectoryUnavailable` among them) is raised or errbacked for the caller to turn
into 451.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from mailappliance.access.relay import normalize_ip
from mailappliance.users.directory import (
    MISS,
    IRelayGrants,
    IRemoteDirectory,
    IRemoteGrants,
    IUserDirectory,
)


class ReactorLookups:
    def __init__(self, store: IUserDirectory, grants: IRelayGrants, reactor, threadpool) -> None:
        self.store = store
        self.grants = grants
        self.reactor = reactor
        self.threadpool = threadpool
        self.remote_store = IRemoteDirectory.providedBy(store)
        self.remote_grants = IRemoteGrants.providedBy(grants)
        self._inflight: dict[tuple, list[Deferred]] = {}
        self.misses = 0                   # queries sent to a thread (for stats and tests)

    def _in_thread(self, key: tuple, fn: Callable, *args) -> Deferred:
        waiters = self._inflight.get(key)
        mine: Deferred = Deferred()
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._inflight[key] = [mine]
        self.misses += 1

        def done(result: Any) -> None:       # each waiter gets the answer or the failure
            for d in self._inflight.pop(key, []):
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)
        deferToThreadPool(self.reactor, self.threadpool, fn, *args).addBoth(done)
        return mine

    # -- the directory -------------------------------------------------------------------------
    def lookup_recipient(self, address: str) -> str | Deferred:
        if not self.remote_store:
            return self.store.lookup_recipient(address)
        hit = self.store.peek_recipient(address)
        if hit is not MISS:
            return hit
        return self._in_thread(("r", address), self.store.lookup_recipient, address)

    def has_domain(self, name: str) -> bool | Deferred:
        if not self.remote_store:
            return self.store.has_domain(name)
        hit = self.store.peek_domain(name)
        if hit is not MISS:
            return hit
        return self._in_thread(("d", name), self.store.has_domain, name)

    # -- the roaming grants --------------------------------------------------------------------
    def is_granted(self, ip: str) -> bool | Deferred:
        if not self.remote_grants:
            return self.grants.is_granted(ip)
        hit = self.grants.peek(ip)
        if hit is not MISS:
            return hit
        return self._in_thread(("g", normalize_ip(ip)), self.grants.is_granted, ip)

    def grant(self, ip: str, seconds: float) -> None | Deferred:
        """A POP3 login's grant: written at once to the file, or in a thread to the database."""
        if not self.remote_grants:
            return self.grants.grant(ip, seconds)
        return deferToThreadPool(self.reactor, self.threadpool, self.grants.grant, ip, seconds)

    def expire(self) -> list[str] | Deferred:
        if not self.remote_grants:
            return self.grants.expire()
        return deferToThreadPool(self.reactor, self.threadpool, self.grants.expire)
