"""The service tree: settings in, one MultiService out.

`make_service(settings, reactor)` builds the shared parts (the App) and one listener per endpoint
string. Each job contributes a `build_factory(app, kind)` in its own `service` module; this file
only wires them. Listening happens in privilegedStartService, so with twistd --uid/--gid every
port is bound as root and no network input is read before the privilege drop.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailappliance.access.relay import RelayGrants
from mailappliance.config import Settings
from mailappliance.users.auth import Authenticator
from mailappliance.users.store import UserStore

# Threads for blocking work (bcrypt, SQLite, fsync). Small: the machine has few cores, and
# bcrypt and fsync gain little beyond a handful of concurrent calls (PEERS.md: ext4 batches
# journal commits up to about 8 concurrent writers).
THREADPOOL_MIN = 2
THREADPOOL_MAX = 10

# endpoint kind -> (module with build_factory, kind passed to it)
FACTORIES: dict[str, tuple[str, str]] = {
    "smtp": ("mailappliance.smtp.service", "smtp"),
    "submission": ("mailappliance.smtp.service", "submission"),
    "submissions": ("mailappliance.smtp.service", "submissions"),
    "pop3": ("mailappliance.pop3.service", "pop3"),
    "pop3s": ("mailappliance.pop3.service", "pop3s"),
    "admin": ("mailappliance.admin.service", "admin"),
}


@dataclass
class App:
    """What every service builder shares. Later parts fill the optional fields."""

    settings: Settings
    reactor: Any
    store: UserStore
    threadpool: ThreadPool
    authenticator: Authenticator
    grants: RelayGrants
    started: float = field(default_factory=time.time)
    injector: Any = None
    queue_manager: Any = None
    resolver: Any = None
    dnsbl: Any = None
    tls: Any = None
    stats: dict[str, Any] = field(default_factory=dict)
    listeners: list["Listener"] = field(default_factory=list)
    # Called with the new Settings after a successful reload.
    reload_hooks: list[Callable[[Settings], None]] = field(default_factory=list)
    # Graceful stop (mailappliance/drain.py): sessions register with app.drain.
    drain: Any = None
    # Run after every listener stopped accepting and before the other services stop; each may
    # return a Deferred (its owner bounds the wait). See AppService.
    stop_hooks: list[Callable[[], Any]] = field(default_factory=list)

    def reload(self, settings: Settings) -> None:
        self.settings = settings
        for hook in self.reload_hooks:
            hook(settings)


class ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class Listener(service.Service):
    """Binds one endpoint in privilegedStartService and remembers the port it got."""

    log = Logger()

    def __init__(self, kind: str, description: str, endpoint, factory) -> None:
        self.kind = kind
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port = None
        self.started_at: float | None = None
        self.listening: defer.Deferred | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listening = self.endpoint.listen(self.factory)
        self.listening.addCallback(self._bound)
        self.listening.addErrback(self._failed)

    def _bound(self, port):
        self.port = port
        self.started_at = time.time()
        self.log.info("{kind}: listening on {where}", kind=self.kind, where=self.address_text())
        return port

    def _failed(self, failure):
        self.log.failure("{kind}: cannot listen on {ep}", failure, kind=self.kind,
                         ep=self.description)
        return failure

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        if self.port is not None:
            return defer.maybeDeferred(self.port.stopListening)
        return None

    def address_text(self) -> str:
        if self.port is None:
            return self.description
        host = self.port.getHost()
        if hasattr(host, "port"):
            return f"{host.host}:{host.port}"
        name = getattr(host, "name", None) or self.description
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)

    def bound_port(self) -> int | str | None:
        if self.port is None:
            return None
        host = self.port.getHost()
        return getattr(host, "port", None) or str(getattr(host, "name", b""), "utf-8", "replace")


class ReadyService(service.Service):
    """Writes data/run/ready.json once every listener is bound; runs hooks (sd_notify, tests)."""

    log = Logger()

    def __init__(self, app: App) -> None:
        self.app = app
        self.waiters: list[Callable[[], Any]] = []   # extra readiness conditions (queue loaded)
        self.on_ready: list[Callable[[App], None]] = []

    def startService(self) -> None:
        super().startService()
        waits = [l.listening for l in self.app.listeners if l.listening is not None]
        waits += [defer.maybeDeferred(w) for w in self.waiters]
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda _: self._ready())
        d.addErrback(self._not_ready)

    def _ready(self) -> None:
        run = self.app.settings.data / "run"
        run.mkdir(parents=True, exist_ok=True)
        listen: dict[str, list] = {}
        for l in self.app.listeners:
            listen.setdefault(l.kind, []).append(l.bound_port())
        payload = {"pid": os.getpid(), "listen": listen}
        tmp = run / "ready.json.tmp"
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, run / "ready.json")
        self.log.info("ready: {listen}", listen=json.dumps(listen))
        for hook in self.on_ready:
            hook(self.app)

    def _not_ready(self, failure) -> None:
        self.log.error("start-up failed: {why}", why=failure.getErrorMessage())
        reactor = self.app.reactor
        if reactor.running:
            reactor.stop()
        else:
            # A listener failed in privilegedStartService, before the reactor runs: stop as
            # soon as it does instead of serving without that listener.
            reactor.callWhenRunning(reactor.stop)

    def stopService(self):
        super().stopService()
        try:
            (self.app.settings.data / "run" / "ready.json").unlink()
        except OSError:
            pass


def build_app(settings: Settings, reactor) -> App:
    data = settings.data
    data.mkdir(parents=True, exist_ok=True)
    store = UserStore(data, settings.bcrypt_cost)
    pool = ThreadPool(THREADPOOL_MIN, THREADPOOL_MAX, name="mailappliance")
    app = App(settings=settings, reactor=reactor, store=store, threadpool=pool,
              authenticator=Authenticator(store, reactor, pool),
              grants=RelayGrants(data / "relay-grants.json", on_change=_log_grant_change))
    return app


_grant_log = Logger(namespace="mailappliance.pop3")


def _log_grant_change(event: str, ip: str) -> None:
    # Grants are logged by POP3 with the user; expiries happen wherever they are noticed.
    if event == "expire":
        _grant_log.info("roaming relay expired: rip={ip}", ip=ip)


def _factory_for(app: App, kind: str):
    module_name, arg = FACTORIES[kind]
    return importlib.import_module(module_name).build_factory(app, arg)


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


def _endpoint_for(app: App, kind: str, description: str, reactor):
    """A job's service module may build its own endpoints (`build_endpoint`; the admin socket
    sets its mode, group and stale-socket lock); otherwise the string is used as it is."""
    module = importlib.import_module(FACTORIES[kind][0])
    build = getattr(module, "build_endpoint", None)
    if build is not None:
        return build(app, kind, description, reactor)
    return endpoints.serverFromString(reactor, description)


def make_service(settings: Settings, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor  # noqa: the adapter tier owns the reactor
    app = build_app(settings, reactor)
    top = AppService(app)
    top.app = app  # type: ignore[attr-defined]
    ThreadPoolService(app.threadpool).setServiceParent(top)

    # Shared parts (queue manager, DNS, TLS, logging, ...): each module's function is called
    # with (app, top) in this order and attaches its services and fills its App field.
    for module_name, function in COMPONENTS:
        getattr(importlib.import_module(module_name), function)(app, top)

    ready = ReadyService(app)
    top.ready = ready  # type: ignore[attr-defined]
    for kind in FACTORIES:
        for description in getattr(settings.listen, kind):
            factory = _factory_for(app, kind)
            if description.startswith("unix:"):
                _prepare_unix_socket(description)
            endpoint = _endpoint_for(app, kind, description, reactor)
            listener = Listener(kind, description, endpoint, factory)
            app.listeners.append(listener)
            listener.setServiceParent(top)
    if app.queue_manager is not None:
        ready.waiters.append(app.queue_manager.when_loaded)
    ready.setServiceParent(top)
    return top


def _prepare_unix_socket(description: str) -> None:
    """Create the socket's directory; remove a stale socket file left by a killed server."""
    path = description.split(":", 1)[1].split(":")[0].replace("\\:", ":")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)


# Component builders: (module, function) with function(app, parent_service) -> None, run in
# this order by make_service before any listener is created.
COMPONENTS: list[tuple[str, str]] = [
    ("mailappliance.instance", "setup"),             # one server per data directory (lock)
    ("mailappliance.logging", "setup"),              # log files first: they see every event
    ("mailappliance.tls", "setup"),                  # app.tls (None without [tls]); reloads
    ("mailappliance.dns", "attach"),                 # app.resolver (before queue and DNSBL)
    ("mailappliance.access.dnsbl", "attach"),        # app.dnsbl
    ("mailappliance.queue.service", "attach"),       # app.injector, app.queue_manager
    ("mailappliance.reload", "setup"),               # app.reloader, SIGHUP
    ("mailappliance.drain", "setup"),                # app.drain (graceful SIGTERM)
    ("mailappliance.notify", "setup"),               # sd_notify READY/WATCHDOG/STOPPING
    ("mailappliance.privileges", "setup"),           # last: root-created files to the data owner
]
