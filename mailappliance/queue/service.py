"""The queue's part of the service tree: `build_queue(...)` makes the queue store, the injector
(the one door), the deliverers and the queue manager, and returns them to make_service, which
builds it after the resolver (remote delivery needs it).

Deliveries get their own small thread pool: a Maildir write holds a thread for an fsync, and
`concurrency_local` of them at once must not take the threads that SMTP injections (and
bcrypt) need from app.threadpool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from twisted.python.threadpool import ThreadPool

from mailappliance.delivery.local import GATHER_WINDOW, LocalDeliverer
from mailappliance.delivery.remote import RemoteDeliverer, client_tls_options, make_is_me
from mailappliance.envelope import DEFERRAL, Result
from mailappliance.queue.inject import Injector
from mailappliance.queue.manager import REMOVAL_WINDOW, QueueManager, make_classifier
from mailappliance.queue.naming import queue_dir
from mailappliance.queue.store import QueueStore

if TYPE_CHECKING:
    from mailappliance.config import Settings
    from mailappliance.dns import ResolverBase
    from mailappliance.reload import LiveSettings
    from mailappliance.users.store import UserStore

# Delivery threads: local deliveries block a thread for their fsyncs, remote ones only for
# short reads.  Beyond ~8 concurrent fsyncs the disk gains little (PEERS.md), so the pool is
# capped below concurrency_local's maximum.
DELIVERY_THREADS_MAX = 16
SECONDS_PER_DAY = 86400
# Domains whose destination (route or not) is remembered; the manager asks several times per
# message, and a route lookup walks the table.  Cleared when full or on a reload.
DESTINATION_CACHE = 10_000


def destination_down(result: Result) -> bool:
    """The remote deliverer reached no server of the destination at all (every address
    refused, unreachable or silent at connect, #4.4.1, or a temporary DNS failure, #4.1.2):
    it says so in `Result.unreachable`.  The queue manager then treats the destination as
    dead (manager.py); a server that answered, even with 4xx or by dropping the connection,
    is alive."""
    return result.status == DEFERRAL and result.unreachable


def destination_of(live: "LiveSettings") -> Callable[[str], str]:
    """domain -> its destination for per-destination limits and dead destinations: the
    route's host:port when [routes] sends the domain there (every routed domain shares
    the smarthost's fate), else the domain itself."""
    cache: dict[str, str] = {}
    seen = [live.settings]

    def of(domain: str) -> str:
        settings = live.settings
        if settings is not seen[0] or len(cache) >= DESTINATION_CACHE:
            cache.clear()               # a reload may have changed [routes]
            seen[0] = settings
        name = cache.get(domain)
        if name is None:
            route = settings.route_for(domain)
            name = cache[domain] = domain if route is None else f"[{route.host}]:{route.port}"
        return name
    return of


def postmaster_of(settings) -> str:
    """Where double bounces go (qmail's doublebounceto: postmaster)."""
    return f"postmaster@{settings.default_domain or settings.hostname}"


@dataclass
class QueueParts:
    """What build_queue made. make_service puts the pool and the manager into the tree (in
    that order: the manager stops before the pool) and `follow` among the reload hooks."""

    store: QueueStore
    injector: Injector
    manager: QueueManager
    delivery_threads: ThreadPool
    follow: Callable[[Settings], None]


def build_queue(live: LiveSettings, reactor, threadpool, users: UserStore,
                resolver: ResolverBase, store: QueueStore | None = None,
                delivery_threads: ThreadPool | None = None, signer=None) -> QueueParts:
    """`live` gives the settings in force (routes are looked up in them at each delivery).
    `signer` (mailauth's ISigner) signs bounces while `[dkim] sign` is on.
    For tests: `store`, a queue store of their own (clock, file operations), and
    `delivery_threads`, a pool instead of the delivery pool made here."""
    settings = live.settings
    if store is None:
        store = QueueStore(queue_dir(settings), recycle=True)
    manager: QueueManager | None = None

    def sign_bounce(message: bytes):
        """Deferred[DKIM-Signature fields] for a bounce (its From: MAILER-DAEMON@<hostname>
        chooses the key; b"" without one), or None while [dkim] sign is off."""
        if signer is None or not live.settings.dkim.sign:
            return None
        return signer.sign(message, "", linesep=b"\n")

    def on_commit(env) -> None:
        if manager is not None:
            manager.notify_envelope(env)

    injector = Injector(store, reactor, threadpool, on_commit_envelope=on_commit)

    q = settings.queue
    pool = delivery_threads or ThreadPool(1, min(DELIVERY_THREADS_MAX, q.concurrency_local + 2),
                                          name="delivery")
    local = LocalDeliverer(users, injector, reactor, pool,
                           hostname=settings.hostname, default_domain=settings.default_domain,
                           gather_window=GATHER_WINDOW)
    remote = RemoteDeliverer(reactor, resolver, pool, hostname=settings.hostname,
                             route_for=lambda domain: live.settings.route_for(domain),
                             connect_timeout=q.connect_timeout, reply_timeout=q.reply_timeout,
                             tls_options=client_tls_options(), is_me=make_is_me())
    manager = QueueManager(store, local=local, remote=remote, injector=injector,
                           reactor=reactor, threadpool=pool,
                           classify=make_classifier(users, settings.hostname),
                           postmaster=postmaster_of(settings), hostname=settings.hostname,
                           concurrency_local=q.concurrency_local,
                           concurrency_remote=q.concurrency_remote,
                           concurrency_destination=q.concurrency_destination,
                           lifetime=q.lifetime_days * SECONDS_PER_DAY,
                           sign_bounce=sign_bounce, destination_of=destination_of(live),
                           destination_down=destination_down, removal_window=REMOVAL_WINDOW)

    def follow(new: Settings) -> None:
        nq = new.queue
        manager.set_limits(nq.concurrency_local, nq.concurrency_remote,
                           nq.lifetime_days * SECONDS_PER_DAY, nq.concurrency_destination)
        remote.connect_timeout = nq.connect_timeout
        remote.reply_timeout = nq.reply_timeout
        local.hostname = remote.hostname = manager.hostname = new.hostname
        local.default_domain = new.default_domain
        manager.postmaster = postmaster_of(new)

    return QueueParts(store, injector, manager, pool, follow)
