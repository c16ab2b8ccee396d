"""The service tree: settings in, one MultiService out.

`make_service(settings, reactor)` builds the parts in start order, each by its own builder
that returns what it made (`tls = build_tls(settings)`, `queue = build_queue(...)`), puts them
together in one App, then builds one listener per endpoint string: the listener kinds and
their builders are the LISTENER_KINDS table below. Nothing is filled in later: a part that
needs another is built after it and gets it as an argument. Listening happens in
privilegedStartService, so with twistd --uid/--gid every port is bound as root and no network
input is read before the privilege drop.

Build order, which is also the order their services start in (the stop runs the other way,
see AppService): the user store, the thread pool, the authenticator and the relay grants; the
instance lock (one server per data directory); logging (its files see every event after it);
TLS; DNS; the DNSBL checker; the queue (delivery threads, manager); reload (SIGHUP); the drain
(graceful stop); sd_notify; handing root-created files to the data owner; the listeners;
readiness (data/run/ready.json).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from mailappliance import datadir, dns, instance, metrics, stats as stats_mod, tls as tls_part
from mailappliance import logging as log_part
from mailappliance.access.dnsbl import DNSBLChecker
from mailappliance.admin import service as admin_service
from mailappliance.app import App, Listener, ReadyService
from mailappliance.config import Settings
from mailappliance.descriptors import describe_plan
from mailappliance.drain import Drain
from mailappliance.enddata import EndOfDataCheck
from mailappliance.mailauth.service import MailAuth, build_mailauth
from mailappliance.notify import NotifyService
from mailappliance.pickup import service as pickup_service
from mailappliance.pop3 import service as pop3_service
from mailappliance.privileges import adopt_tree, data_owner
from mailappliance.queue.service import build_queue
from mailappliance.reload import HangupService, LiveSettings, Reloader, follow_bcrypt_cost
from mailappliance.scan.service import ScanCheck
from mailappliance.smtp import service as smtp_service
from mailappliance.users.auth import Authenticator
from mailappliance.users.backend import open_grants, open_user_store
from mailappliance.users.directory import IRelayGrants, IRemoteDirectory, IUserDirectory

if TYPE_CHECKING:
    from twisted.internet.interfaces import (IProtocolFactory, IStreamServerEndpoint)

    from mailappliance.queue.store import QueueStore
    from mailappliance.tls import TLSContext

# Threads for blocking work (bcrypt, SQLite, fsync). Small: the machine has few cores, and
# bcrypt and fsync gain little beyond a handful of concurrent calls (PEERS.md: ext4 batches
# journal commits up to about 8 concurrent writers).
THREADPOOL_MIN = 2
THREADPOOL_MAX = 10


class ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class AdoptService(service.Service):
    """The last part make_service adds, so it runs last in privilegedStartService: after every
    part built its files as root, before twistd drops privileges."""

    log = Logger(namespace="mailappliance.privileges")

    def __init__(self, data: Path) -> None:
        self.data = data

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        changed = adopt_tree(self.data)
        if changed:
            owner = data_owner(self.data)
            self.log.info("handed {n} files created as root to uid {uid} (owner of {data})",
                          n=len(changed), uid=owner[0] if owner else "?", data=str(self.data))


def follow_tls_reload(app: App, settings: Settings) -> None:
    """The reload hook of `app.tls`: a new certificate pair, or TLS switched on for a server
    started without one (it cannot be switched off without a restart). Raises ConfigError (the
    reloader then refuses the reload and restores the old settings); the certificate in use
    stays until a new pair loads completely."""
    if settings.tls.cert is None:
        return          # TLS cannot be switched off without a restart; keep it
    try:
        if app.tls is None:
            app.tls = tls_part.TLSContext(settings.tls)
        else:
            app.tls.reload(settings.tls)
    except tls_part.ConfigError as e:
        tls_part.TLSContext.log.error("tls: reload failed, keeping the old certificate: {why}",
                             why=str(e))
        raise



_grant_log = Logger(namespace="mailappliance.pop3")
_descriptor_log = Logger(namespace="mailappliance.service")
_directory_log = Logger(namespace="mailappliance.users")

# Threads that answer the directory's cache misses with PostgreSQL (users/lookups.py): their
# own pool, so an RCPT never queues behind the queue's fsync batches in the main one. As many
# as the database connections one node holds (pgstore.POOL_MAX): more would only wait there.
LOOKUP_THREADS_MAX = 4


def _log_directory_event(what: str, why: str) -> None:
    # The watcher's connection (users/pgstore.py): lost means lookups bypass the cache and a
    # database that stays away turns RCPTs and logins into temporary failures.
    if what == "lost":
        _directory_log.warn("directory: database connection lost: {why}", why=why)
    else:
        _directory_log.info("directory: database connection {what}", what=what)


class DirectoryService(service.Service):
    """PostgreSQL's pool and watcher threads, started here (after twistd forked and dropped
    privileges: a fork keeps no threads) and closed last, after everything that asks them."""

    def __init__(self, store: IUserDirectory) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        db = getattr(self.store, "db", None)
        if db is not None:
            db.start()

    def stopService(self):
        super().stopService()
        from twisted.internet.threads import deferToThread
        return deferToThread(self.store.close)     # joins the watcher: not on the reactor


class LogCounterService(service.Service):
    """Keeps a log observer that counts events for `stat` (stats.FailedLogins) registered
    while the server runs."""

    def __init__(self, observer, publisher=globalLogPublisher) -> None:
        self.observer = observer
        self.publisher = publisher

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self.observer)

    def stopService(self) -> None:
        super().stopService()
        self.publisher.removeObserver(self.observer)


def _log_grant_change(event: str, ip: str) -> None:
    # Grants are logged by POP3 with the user; expiries happen wherever they are noticed.
    if event == "expire":
        _grant_log.info("roaming relay expired: rip={ip}", ip=ip)


# A stop phase that takes longer than this is logged and the stop goes on without it, so a
# wedged part cannot keep the process from exiting (systemd's TimeoutStopSec is 90 s).
STOP_PHASE_TIMEOUT = 60.0


class AppService(service.MultiService):
    """The root of the tree. It starts like a MultiService and stops in phases: every listener
    stops accepting; then app.stop_hooks run (the drain: sessions in DATA finish or get 421);
    then the other services stop one after the other in reverse order of start, each waited
    for (the queue manager before the thread pool that finishes in-flight writes)."""

    log = Logger()

    def __init__(self, app: App) -> None:
        super().__init__()
        self.app = app

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        children = list(self)
        listeners = [s for s in children if isinstance(s, Listener)]
        yield self._bounded(defer.DeferredList(
            [defer.maybeDeferred(l.stopService) for l in listeners], consumeErrors=True),
            "stop listening")
        yield self._bounded(defer.DeferredList(
            [defer.maybeDeferred(h) for h in self.app.stop_hooks], consumeErrors=True),
            "drain")
        for child in reversed(children):
            if isinstance(child, Listener):
                continue
            try:
                yield self._bounded(defer.maybeDeferred(child.stopService),
                                    type(child).__name__)
            except Exception:
                self.log.failure("stopping {name} failed", name=type(child).__name__)

    def _bounded(self, d: defer.Deferred, what: str) -> defer.Deferred:
        def late(failure):
            failure.trap(defer.TimeoutError, defer.CancelledError)
            self.log.warn("stop: {what} took longer than {t:.0f} s, going on", what=what,
                          t=STOP_PHASE_TIMEOUT)
        d.addTimeout(STOP_PHASE_TIMEOUT, self.app.reactor)
        d.addErrback(late)
        return d


# --- building -----------------------------------------------------------------------------------

@dataclass
class Shared:
    """The parts built first, before the instance lock (as they always were): the user store
    (it creates the data directory), the thread pool, the authenticator, the relay grants."""

    store: IUserDirectory
    threadpool: ThreadPool
    authenticator: Authenticator
    grants: IRelayGrants
    lookup_threads: ThreadPool | None = None     # directory misses: PostgreSQL's own pool


def build_shared(settings: Settings, reactor, threadpool: ThreadPool | None = None,
                 grants_clock: Callable[[], float] = time.monotonic) -> Shared:
    """`threadpool` and `grants_clock` are for tests (testing/app.py): an inline pool, and
    grants that expire on the test's reactor clock."""
    data = settings.data
    datadir.make_dir(data)                                 # 0700 if new (datadir.py)
    # [users] database: SQLite in data (as always) or PostgreSQL, whose schema is created or
    # upgraded here; its threads start in DirectoryService, after twistd forks.
    store = open_user_store(settings, on_event=_log_directory_event, start=False)
    pool = threadpool or ThreadPool(THREADPOOL_MIN, THREADPOOL_MAX, name="mailappliance")
    lookup_threads = pool
    if IRemoteDirectory.providedBy(store):
        lookup_threads = threadpool or ThreadPool(1, LOOKUP_THREADS_MAX,
                                                  name="mailappliance-directory")
    return Shared(store, pool, Authenticator(store, reactor, pool),
                  open_grants(store, data, on_change=_log_grant_change, clock=grants_clock),
                  lookup_threads)


def build_app(settings: Settings, reactor, shared: Shared, *, stats: dict[str, Any],
              started: float, instance_lock: int | None = None,
              follow_log: Callable[[Settings], None] | None = None,
              queue_store: QueueStore | None = None,
              delivery_threads: ThreadPool | None = None) -> App:
    """The parts after logging, in start order (TLS, DNS, DNSBL, the queue, reload, the drain),
    put together in the App; their reload hooks follow in the same order, after the log's
    (`follow_log`). `queue_store` and `delivery_threads` are for tests (testing/app.py)."""
    tls = tls_part.build_tls(settings)
    resolver = dns.build_resolver(settings, reactor)
    dnsbl = DNSBLChecker.from_settings(settings, resolver, reactor)
    live = LiveSettings(settings)
    mailauth = build_mailauth(live, resolver, reactor, shared.threadpool)
    queue = build_queue(live, reactor, shared.threadpool, shared.store, resolver,
                        store=queue_store, delivery_threads=delivery_threads,
                        signer=mailauth.signer)
    stats["queue"] = queue.manager.stats
    pool = shared.threadpool

    def run_blocking(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    reloader = Reloader(live, run_blocking, stats)
    stats["config_loaded"] = time.time()
    drain = Drain(reactor)
    scan = ScanCheck(settings, reactor)
    app = App(live=live, reactor=reactor, store=shared.store, threadpool=pool,
              authenticator=shared.authenticator, grants=shared.grants, tls=tls,
              resolver=resolver, dnsbl=dnsbl, queue_store=queue.store, injector=queue.injector,
              queue_manager=queue.manager, delivery_threads=queue.delivery_threads,
              reloader=reloader, drain=drain, verifier=mailauth.verifier,
              signer=mailauth.signer, end_of_data=build_end_of_data(mailauth, scan),
              stats=stats, started=started,
              instance_lock=instance_lock, stop_hooks=[drain.start], scan=scan,
              lookup_threads=shared.lookup_threads)
    hooks = [] if follow_log is None else [follow_log]
    hooks += [lambda new: follow_tls_reload(app, new), resolver.reload, dnsbl.reload,
              queue.follow, follow_bcrypt_cost(shared.store), mailauth.follow, scan.follow]
    live.hooks.extend(hooks)
    return app


def build_end_of_data(mailauth: MailAuth, scan: ScanCheck) -> list[EndOfDataCheck]:
    """The checks between a message's final dot and its queue commit, in the order they run
    (enddata.py): verification of mail from the internet first (cheap, may refuse), then
    content scanning (sees our Authentication-Results), signing of our users' mail last (it
    signs the bytes queued; nothing after it may change them)."""
    return [mailauth.verify_check, scan, mailauth.sign_check]


def plain_endpoint(app: App, kind: str, description: str, reactor) -> IStreamServerEndpoint:
    """The endpoint string as it is."""
    return endpoints.serverFromString(reactor, description)


@dataclass(frozen=True)
class ListenerKind:
    """A kind of listener: the endpoint strings of `[listen] <name>` (and --<name>), each
    served by a factory from `build_factory(app, name)` on an endpoint from
    `build_endpoint(app, name, description, reactor)`. With `one_factory`, every endpoint of
    the kind shares the first factory (admin: one connection limit, one token)."""

    name: str
    build_factory: Callable[[App, str], IProtocolFactory]
    build_endpoint: Callable[[App, str, str, Any], IStreamServerEndpoint] = plain_endpoint
    one_factory: bool = False


# In start order, which is also the order `stat` lists them in.
LISTENER_KINDS: tuple[ListenerKind, ...] = (
    ListenerKind("smtp", smtp_service.build_factory, smtp_service.build_endpoint),
    ListenerKind("submission", smtp_service.build_factory, smtp_service.build_endpoint),
    ListenerKind("submissions", smtp_service.build_factory, smtp_service.build_endpoint),
    ListenerKind("pop3", pop3_service.build_factory),
    ListenerKind("pop3s", pop3_service.build_factory),
    ListenerKind("admin", admin_service.build_factory, admin_service.build_endpoint,
                 one_factory=True),
    ListenerKind("inject", pickup_service.build_factory, pickup_service.build_endpoint,
                 one_factory=True),
    ListenerKind("metrics", metrics.build_factory, one_factory=True),
)


def build_listeners(app: App) -> list[Listener]:
    """One Listener per endpoint string, kind by kind; each is also added to app.listeners."""
    made = []
    for kind in LISTENER_KINDS:
        factory = None
        for description in getattr(app.settings.listen, kind.name):
            if factory is None or not kind.one_factory:
                factory = kind.build_factory(app, kind.name)
            if description.startswith("unix:"):
                _prepare_unix_socket(description)
            endpoint = kind.build_endpoint(app, kind.name, description, app.reactor)
            listener = Listener(kind.name, description, endpoint, factory)
            app.listeners.append(listener)
            made.append(listener)
    plan = app.descriptors.plan(app.settings)      # each listener's share of RLIMIT_NOFILE
    (_descriptor_log.info if plan.fits else _descriptor_log.warn)("{text}",
                                                                  text=describe_plan(plan))
    return made


def make_service(settings: Settings, reactor=None) -> AppService:
    if reactor is None:
        from twisted.internet import reactor  # noqa: the adapter tier owns the reactor
    started = time.time()
    shared = build_shared(settings, reactor)
    lock = instance.hold_lock(settings)                   # one server per data directory
    stats: dict[str, Any] = {}
    # Logging first of the rest: its files see every event after this.
    log_service, follow_log = log_part.build_service(settings, reactor, stats)
    app = build_app(settings, reactor, shared, stats=stats, started=started,
                    instance_lock=lock, follow_log=follow_log)
    ready = ReadyService(app)
    ready.waiters.append(app.queue_manager.when_loaded)
    # One PING per configured scanner once the reactor runs: the log says whether they answer.
    # A scanner that is down does not hold up start-up (docs/SCANNING.md).
    reactor.callWhenRunning(app.scan.start)
    top = AppService(app)
    parts: list[service.IService] = [
        # PostgreSQL's threads: started first, stopped last (SQLite has none).
        *([DirectoryService(app.store)] if IRemoteDirectory.providedBy(app.store) else []),
        ThreadPoolService(app.threadpool),
        log_service,
        LogCounterService(stats_mod.FailedLogins(stats)),  # failed logins for stat/metrics
        ThreadPoolService(app.delivery_threads),          # stops after the manager
        *([ThreadPoolService(app.lookup_threads)]
          if app.lookup_threads not in (None, app.threadpool) else []),
        app.queue_manager,
        HangupService(app.reloader, reactor),              # SIGHUP
        NotifyService(ready, reactor),                     # sd_notify READY/WATCHDOG/STOPPING
        AdoptService(settings.data),                       # last: root-created files to the owner
        *build_listeners(app),
        ready,                                             # data/run/ready.json
    ]
    for part in parts:
        part.setServiceParent(top)
    ready.on_ready.append(freeze_startup_objects)
    return top


def freeze_startup_objects(_app: App | None = None) -> None:
    """Once the server is ready, move every object alive then (modules, the configuration,
    the service tree, the loaded code's constants: several hundred thousand objects that live
    as long as the process) out of the cyclic garbage collector's view (`gc.freeze`, CPython
    3.7+). The collector's full passes, which the per-message objects of a busy server trigger
    again and again, then walk only what was made since. Reference counting still frees
    anything frozen that is dropped later; only a reference cycle among frozen objects would
    stay, and the start-up objects are kept for the process's life anyway."""
    gc.collect()
    gc.freeze()


def _prepare_unix_socket(description: str) -> None:
    """Create the socket's directory; remove a stale socket file left by a killed server."""
    path = description.split(":", 1)[1].split(":")[0].replace("\\:", ":")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
