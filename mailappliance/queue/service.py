"""make_service component for the queue: app.injector (the one door) and app.queue_manager.

Called by mailappliance.service.make_service as ``attach(app, parent)`` after the DNS
component (remote delivery needs app.resolver).

Deliveries get their own small thread pool: a Maildir write holds a thread for an fsync, and
`concurrency_local` of them at once must not take the threads that SMTP injections (and
bcrypt) need from app.threadpool.
"""

from __future__ import annotations

from twisted.python.threadpool import ThreadPool

from mailappliance.delivery.local import LocalDeliverer
from mailappliance.delivery.remote import RemoteDeliverer, client_tls_options, make_is_me
from mailappliance.queue.inject import Injector
from mailappliance.queue.manager import QueueManager, make_classifier
from mailappliance.queue.naming import queue_dir
from mailappliance.queue.store import QueueStore
from mailappliance.service import ThreadPoolService

# Delivery threads: local deliveries block a thread for their fsyncs, remote ones only for
# short reads.  Beyond ~8 concurrent fsyncs the disk gains little (PEERS.md), so the pool is
# capped below concurrency_local's maximum.
DELIVERY_THREADS_MAX = 16
SECONDS_PER_DAY = 86400


def postmaster_of(settings) -> str:
    """Where double bounces go (qmail's doublebounceto: postmaster)."""
    return f"postmaster@{settings.default_domain or settings.hostname}"


def attach(app, parent) -> None:
    settings = app.settings
    store = QueueStore(queue_dir(settings))
    app.queue_store = store

    def on_commit(env) -> None:
        if app.queue_manager is not None:
            app.queue_manager.notify_envelope(env)

    app.injector = Injector(store, app.reactor, app.threadpool, on_commit_envelope=on_commit)

    q = settings.queue
    pool = ThreadPool(1, min(DELIVERY_THREADS_MAX, q.concurrency_local + 2), name="delivery")
    ThreadPoolService(pool).setServiceParent(parent)
    local = LocalDeliverer(app.store, app.injector, app.reactor, pool,
                           hostname=settings.hostname, default_domain=settings.default_domain)
    remote = RemoteDeliverer(app.reactor, app.resolver, pool, hostname=settings.hostname,
                             route_for=lambda domain: app.settings.route_for(domain),
                             connect_timeout=q.connect_timeout, reply_timeout=q.reply_timeout,
                             tls_options=client_tls_options(), is_me=make_is_me())
    manager = QueueManager(store, local=local, remote=remote, injector=app.injector,
                           reactor=app.reactor, threadpool=pool,
                           classify=make_classifier(app.store, settings.hostname),
                           postmaster=postmaster_of(settings), hostname=settings.hostname,
                           concurrency_local=q.concurrency_local,
                           concurrency_remote=q.concurrency_remote,
                           lifetime=q.lifetime_days * SECONDS_PER_DAY)
    app.queue_manager = manager
    app.stats["queue"] = manager.stats
    manager.setServiceParent(parent)

    def reloaded(new) -> None:
        nq = new.queue
        manager.set_limits(nq.concurrency_local, nq.concurrency_remote,
                           nq.lifetime_days * SECONDS_PER_DAY)
        remote.connect_timeout = nq.connect_timeout
        remote.reply_timeout = nq.reply_timeout
        local.hostname = remote.hostname = manager.hostname = new.hostname
        local.default_domain = new.default_domain
        manager.postmaster = postmaster_of(new)

    app.reload_hooks.append(reloaded)
