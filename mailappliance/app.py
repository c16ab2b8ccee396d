"""The App: the parts of one server that every listener's factory shares, declared with their
types, and the two small services every tree has around its listeners (Listener, ReadyService).

This module sits between the parts and the tree: it imports the parts' types (for annotations
only) and the job services (smtp/pop3/admin `build_factory`, notify) import it; service.py,
which builds everything, imports both. Nothing below imports it back.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.access.penalty import LoginPenalty
from mailappliance.config import Settings
from mailappliance.descriptors import DescriptorBudget
from mailappliance.startup import StartupFailed, fail_running, listen_error

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.threadpool import ThreadPool

    from mailappliance.access.dnsbl import DNSBLChecker
    from mailappliance.dns import Resolver
    from mailappliance.drain import Drain
    from mailappliance.enddata import EndOfDataCheck
    from mailappliance.mailauth.service import Signer, Verifier
    from mailappliance.queue.inject import Injector
    from mailappliance.queue.manager import QueueManager
    from mailappliance.queue.store import QueueStore
    from mailappliance.reload import LiveSettings, Reloader
    from mailappliance.scan.service import ScanCheck
    from mailappliance.tls import TLSContext
    from mailappliance.users.auth import Authenticator
    from mailappliance.users.directory import IRelayGrants, IUserDirectory


@dataclass
class App:
    """What every listener's factory shares: the parts make_service built, all of them given
    when the App is made. Afterwards only the configuration in force (`live`, changed by a
    reload), `tls` (a reload may switch TLS on for a server started without it) and the lists
    change."""

    live: LiveSettings                  # the settings in force and their reload hooks
    reactor: IReactorTime               # and IReactorCore, IReactorFromThreads: the reactor
    store: IUserDirectory               # domains, users, aliases ([users] database)
    threadpool: ThreadPool              # blocking work: bcrypt, SQLite, queue writes
    authenticator: Authenticator        # SMTP AUTH and POP3 logins
    grants: IRelayGrants                # POP-before-SMTP roaming relay
    tls: TLSContext | None              # None without [tls]
    resolver: Resolver
    dnsbl: DNSBLChecker
    queue_store: QueueStore
    injector: Injector                  # the one door into the queue
    queue_manager: QueueManager
    delivery_threads: ThreadPool        # Maildir writes and remote reads (queue/service.py)
    reloader: Reloader                  # SIGHUP and the admin `reload`
    drain: Drain                        # graceful stop: sessions register with it
    verifier: Verifier                  # SPF at MAIL FROM; DKIM, DMARC (mailauth/service.py)
    signer: Signer                      # DKIM signing at injection (mailauth/service.py)
    # The checks between a message's final dot and its commit, in order (enddata.py).
    end_of_data: list[EndOfDataCheck]
    stats: dict[str, Any]               # counters for `stat` (mailappliance/stats.py)
    started: float                      # time.time() when the tree was built
    instance_lock: int | None = None    # data/run/lock's descriptor (None in tests)
    scan: ScanCheck | None = None       # [scan]'s end-of-data check (also in end_of_data)
    # One login penalty table for SMTP AUTH and POP3 (access/penalty.py).
    login_penalty: LoginPenalty = field(default_factory=LoginPenalty)
    # RLIMIT_NOFILE, the reserve and each network listener's share (descriptors.py).
    descriptors: DescriptorBudget = field(default_factory=DescriptorBudget)
    listeners: list[Listener] = field(default_factory=list)
    # Run after every listener stopped accepting and before the other services stop; each may
    # return a Deferred (its owner bounds the wait). See AppService.
    stop_hooks: list[Callable[[], Any]] = field(default_factory=list)
    # The pool that answers directory cache misses: PostgreSQL's own, else `threadpool`.
    lookup_threads: ThreadPool | None = None

    @property
    def lookups(self):
        """users.lookups.ReactorLookups on the current store and grants: what the reactor
        thread asks (SMTP's RCPT and grant checks, POP3's grants). Made again when a test
        puts another store or grants in place."""
        made = self.__dict__.get("_lookups")
        if made is None or made.store is not self.store or made.grants is not self.grants:
            from mailappliance.users.lookups import ReactorLookups
            made = self._lookups = ReactorLookups(
                self.store, self.grants, self.reactor, self.lookup_threads or self.threadpool)
        return made

    @property
    def settings(self) -> Settings:
        return self.live.settings

    @property
    def reload_hooks(self) -> list[Callable[[Settings], None]]:
        """Called with the new Settings after a successful reload, in the order added."""
        return self.live.hooks

    def reload(self, settings: Settings) -> None:
        self.live.apply(settings)


class Listener(service.Service):
    """Binds one endpoint in privilegedStartService and remembers the port it got."""

    log = Logger(namespace="mailappliance.service.Listener")   # the log's area: server

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
        if self.listening.called and isinstance(self.listening.result, Failure):
            # Failed at once (port in use): fail the start now, before anything else starts.
            failure = self.listening.result
            self.listening.addErrback(lambda _: None)
            failure.raiseException()

    def _bound(self, port):
        self.port = port
        self.started_at = time.time()
        if self.running:              # bound late; else said in startService
            self._say_listening()
        return port

    def _say_listening(self) -> None:
        # Said once the whole tree started, so a start that fails says only why (startup.py).
        self.log.info("{kind}: listening on {where}", kind=self.kind, where=self.address_text())

    def _failed(self, failure):
        # Logged once, as the start-up failure (mailappliance.startup), not here.
        raise StartupFailed(f"{self.kind}: cannot listen on {self.description}: "
                            f"{listen_error(failure.value)}")

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        super().startService()
        if self.port is not None:
            self._say_listening()

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

    log = Logger(namespace="mailappliance.service.ReadyService")

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
        try:
            tmp.write_text(json.dumps(payload))
            os.replace(tmp, run / "ready.json")
        except OSError as e:
            tmp.unlink(missing_ok=True)      # a full disk: no half-written file left behind
            raise StartupFailed(f"cannot write {tmp}: {e.strerror or e}") from None
        self.log.info("ready: {listen}", listen=json.dumps(listen))
        for hook in self.on_ready:
            hook(self.app)

    def _not_ready(self, failure) -> None:
        # One line, stop (every port closes), exit status 1: mailappliance.startup.
        fail_running(self.app.reactor, failure, self.app.settings.data)

    def stopService(self):
        super().stopService()
        try:
            (self.app.settings.data / "run" / "ready.json").unlink()
        except OSError:
            pass
