"""Reload: re-read the configuration file and the rules file (SIGHUP, `mailappliance reload`).

The new file is parsed completely (same strict checks as at start-up, with the same
command-line overrides) before anything changes. A bad file is refused with its one-line
reason and the old configuration stays in force. A good one is swapped in with
`App.reload(settings)`, which runs every part's reload hook (rules, DNSBL zones, TLS
certificate, limits, log rotation). What cannot change in a running process -- the data
directory, the listening endpoints, the log directory, the admin socket's permissions --
keeps its old value, and the reply names what needs a restart.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailappliance.config import ConfigError, Settings, load_settings

# Settings a running process cannot apply: (dotted name, getter, setter).
RESTART_ONLY: tuple[str, ...] = ("data", "listen", "log.directory", "admin.socket_mode",
                                 "admin.socket_group")


class ReloadRefused(Exception):
    """The new configuration was not applied; str() is the one-line reason."""


def load_new(settings: Settings) -> Settings:
    """Blocking: parse the configuration again as the running one was made."""
    return load_settings(settings.config_path, dict(settings.cli_overrides), cwd=settings.cwd)


def _get(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def keep_restart_only(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """`new` with the restart-only values of `old`; names the ones that differ."""
    differ = []
    for name in RESTART_ONLY:
        if _get(old, name) != _get(new, name):
            if name == "listen":
                for f in dataclasses.fields(old.listen):
                    if getattr(old.listen, f.name) != getattr(new.listen, f.name):
                        differ.append(f"listen.{f.name}")
            else:
                differ.append(name)
    log = dataclasses.replace(new.log, directory=old.log.directory)
    admin = dataclasses.replace(new.admin, socket_mode=old.admin.socket_mode,
                                socket_group=old.admin.socket_group)
    merged = dataclasses.replace(new, data=old.data, listen=old.listen, log=log, admin=admin)
    return merged, differ


def describe(settings: Settings) -> list[str]:
    where = str(settings.config_path) if settings.config_path else "embedded defaults"
    rules = (f"{settings.rules.count} rules from {settings.rules.source}"
             if settings.rules is not None else "no rules file")
    return [f"configuration reloaded from {where}", rules]


class LiveSettings:
    """The settings in force and the parts that follow them.

    `apply(settings)` swaps the settings in, then runs every hook in the order it was added
    (make_service adds them in start order); a hook that raises stops the loop and the
    Reloader applies the old settings again the same way. `App.settings` reads `settings`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hooks: list[Callable[[Settings], None]] = []

    def apply(self, settings: Settings) -> None:
        self.settings = settings
        for hook in self.hooks:
            hook(settings)


class Reloader:
    """One reload at a time; parsing runs in `run_blocking` (the thread pool)."""

    log = Logger(namespace="mailappliance.reload")

    def __init__(self, live: LiveSettings, run_blocking: Callable[..., defer.Deferred],
                 stats: dict[str, Any] | None = None,
                 load: Callable[[Settings], Settings] = load_new,
                 clock: Callable[[], float] = time.time) -> None:
        self.live = live
        self.stats: dict[str, Any] = {} if stats is None else stats
        self.load = load
        self.clock = clock
        self._lock = defer.DeferredLock()
        self.run_blocking = run_blocking
        self.reloads = 0

    def reload(self, origin: str) -> defer.Deferred:
        """Deferred firing with reply lines, or failing with ReloadRefused."""
        return self._lock.run(self._reload, origin)

    @defer.inlineCallbacks
    def _reload(self, origin: str):
        old = self.live.settings
        try:
            new = yield self.run_blocking(self.load, old)
        except ConfigError as e:
            self.log.error("reload ({origin}) refused, the old configuration stays in force: "
                           "{why}", origin=origin, why=str(e))
            raise ReloadRefused(f"reload refused: {e}; the old configuration stays in force")
        merged, restart = keep_restart_only(old, new)
        try:
            self.live.apply(merged)
        except Exception as e:
            self.log.failure("reload ({origin}): a part failed to apply the new configuration; "
                             "going back to the old one", origin=origin)
            try:
                self.live.apply(old)
            except Exception:
                self.log.failure("reload: restoring the old configuration failed too")
            raise ReloadRefused(f"reload refused: {type(e).__name__}: {e}; "
                                "the old configuration stays in force")
        self.reloads += 1
        self.stats["config_loaded"] = self.clock()
        lines = describe(merged)
        if restart:
            lines.append("not applied until restart: " + ", ".join(restart))
        self.log.info("reload ({origin}): {summary}", origin=origin, summary="; ".join(lines))
        return lines


class HangupService(service.Service):
    """SIGHUP does what `reload` does (qmail-send re-reads its control files on HUP)."""

    log = Logger(namespace="mailappliance.reload")

    def __init__(self, reloader: Reloader, reactor, signals=signal) -> None:
        self.reloader = reloader
        self.reactor = reactor
        self.signals = signals
        self._previous = None
        self.last: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._previous = self.signals.signal(self.signals.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            self.signals.signal(self.signals.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        # A signal handler runs between two bytecodes of whatever the reactor thread is doing;
        # hand the work to the reactor loop, as Twisted's own SIGTERM handler does.
        self.reactor.callFromThread(self.hangup)

    def hangup(self) -> defer.Deferred:
        self.log.info("received SIGHUP, reloading")
        d = self.reloader.reload("SIGHUP")
        d.addErrback(lambda f: f.trap(ReloadRefused) and None)   # already logged
        self.last = d
        return d


def follow_bcrypt_cost(store) -> Callable[[Settings], None]:
    """A reload hook: the user store hashes new passwords at the configured cost."""
    def follow(settings: Settings) -> None:
        store.bcrypt_cost = settings.bcrypt_cost
    return follow
