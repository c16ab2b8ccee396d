"""build_factory(app, kind) for the `pop3` and `pop3s` listeners (service.LISTENER_KINDS).

`pop3` offers STLS when [tls] is configured; `pop3s` is implicit TLS (RFC 8314) and needs it.
`settings.pop3.require_tls = true` refuses USER/PASS until STLS on the plain port (RFC 2595
section 2.3's "LOGINDISABLED" idea for POP3); it needs [tls] too.

Both listeners of one App share the login penalty table with SMTP AUTH (an address is one
client whichever port it uses; mailappliance/access/penalty.py) and the roaming-relay expiry
sweep.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailappliance.config import ConfigError
from mailappliance.pop3.mailbox import open_session
from mailappliance.pop3.nodelock import open_node_session
from mailappliance.pop3.protocol import POP3Factory

if TYPE_CHECKING:
    from mailappliance.app import App

log = Logger(namespace="mailappliance.pop3")

# How often expired roaming-relay grants are dropped (and logged) even without SMTP traffic
# asking for them; a grant lasts minutes, so a minute's lateness in the log is harmless.
GRANT_SWEEP_SECONDS = 60


class _Shared:
    """Per-App POP3 state shared by every POP3 listener."""

    def __init__(self, app: App) -> None:
        self.penalty = app.login_penalty             # one table with SMTP AUTH
        self.factories: set[POP3Factory] = set()
        self.sweeper = task.LoopingCall(self._sweep, app)
        self.sweeper.clock = app.reactor

    @staticmethod
    def _sweep(app: App):
        # The grants' on_change hook (service.py) logs each expiry it drops. With PostgreSQL
        # a Deferred from a thread (app.lookups); a failure is logged and the sweep goes on.
        try:
            result = app.lookups.expire()
        except OSError as e:
            log.warn("roaming relay sweep failed: {why}", why=str(e))
            return None
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: log.warn("roaming relay sweep failed: {why}",
                                                 why=str(f.value)))
            return result
        return None


_shared: dict[int, _Shared] = {}


def _shared_for(app: App) -> _Shared:
    key = id(app)
    state = _shared.get(key)
    if state is None:
        state = _shared[key] = _Shared(app)
        weakref.finalize(app, _shared.pop, key, None)
    return state


class _ListenerFactory(POP3Factory):
    """POP3Factory that starts the shared grant sweep while any POP3 listener runs."""

    shared: _Shared

    def startFactory(self) -> None:
        self.shared.factories.add(self)
        if not self.shared.sweeper.running:
            self.shared.sweeper.start(GRANT_SWEEP_SECONDS, now=False)

    def stopFactory(self) -> None:
        self.shared.factories.discard(self)
        if not self.shared.factories and self.shared.sweeper.running:
            self.shared.sweeper.stop()


def build_factory(app: App, kind: str):
    if kind not in ("pop3", "pop3s"):
        raise ValueError(f"pop3.service cannot build {kind!r}")
    settings = app.settings
    if kind == "pop3s" and app.tls is None:
        raise ConfigError("listen.pop3s: needs a [tls] cert and key")
    if kind == "pop3" and settings.pop3.require_tls and app.tls is None:
        raise ConfigError("pop3.require_tls: needs a [tls] cert and key (for STLS)")

    shared = _shared_for(app)
    reactor = app.reactor

    def run_blocking(fn, *args):
        return deferToThreadPool(reactor, app.threadpool, fn, *args)

    def authenticate(login: str, password: str):
        return app.authenticator.authenticate(login, password, app.settings.default_domain)

    # Several nodes on PostgreSQL: the one-session lock holds across them (pop3/nodelock.py).
    locks = getattr(app.store, "mailbox_locks", None)

    def open_mailbox(user):
        if locks is not None:
            return run_blocking(open_node_session, user.maildir, locks, user.address)
        return run_blocking(open_session, user.maildir)

    def grant(ip: str, user: Any) -> None:
        minutes = app.settings.pop3.roaming_relay_minutes
        if minutes <= 0:
            return
        def granted(_=None):
            log.info("roaming relay granted: rip={ip} user=<{user}> minutes={minutes}",
                     ip=ip, user=user.address, minutes=minutes)

        def failed(f):
            # The login stands (the mailbox is there); only the relay window is missing.
            log.error("roaming relay grant failed: rip={ip} user=<{user}>: {why}", ip=ip,
                      user=user.address, why=str(f.value))
        try:
            result = app.lookups.grant(ip, minutes * 60)
        except OSError as e:
            failed(Failure(e))
            return
        if isinstance(result, defer.Deferred):
            result.addCallbacks(granted, failed)
        else:
            granted()

    def limits() -> tuple[int, int, int]:
        s = app.settings
        return s.pop3.max_per_ip, s.pop3.max_connections, app.descriptors.share(s, kind)

    factory = _ListenerFactory(
        reactor=reactor, hostname=settings.hostname, authenticate=authenticate,
        open_mailbox=open_mailbox, run_blocking=run_blocking, grant=grant,
        penalty=shared.penalty, tls=lambda: app.tls, implicit_tls=(kind == "pop3s"),
        require_tls=settings.pop3.require_tls, timeout=settings.pop3.timeout,
        drain=lambda: app.drain,
        stats=app.stats, kind=kind, limits=limits)
    factory.shared = shared

    def on_reload(new_settings) -> None:
        factory.hostname = new_settings.hostname
        factory.require_tls = new_settings.pop3.require_tls and app.tls is not None
        factory.timeout = new_settings.pop3.timeout

    app.reload_hooks.append(on_reload)
    if kind == "pop3s":
        # The TLSContext is itself the connection creator: reloads reach new connections.
        return TLSMemoryBIOFactory(app.tls.options(), False, factory)
    return factory
