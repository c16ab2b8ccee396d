"""systemd readiness and watchdog (sd_notify(3)) with the standard library only.

The protocol is one datagram of ``KEY=value`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). The server sends

- ``READY=1`` once every listener is bound and every readiness condition (the queue loaded)
  is met: it hooks service.ReadyService.on_ready, which fires after data/run/ready.json is
  written;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` from the reactor loop (so a wedged reactor
  stops the pings and systemd restarts the service), if systemd asked for it and
  ``$WATCHDOG_PID`` is unset or ours;
- ``STOPPING=1`` as soon as the stop begins.

Without ``$NOTIFY_SOCKET`` (not under systemd, Type=simple) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Mapping

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

if TYPE_CHECKING:
    from mailappliance.app import App, ReadyService

# sd_watchdog_enabled(3): "it is recommended that a daemon sends a keep-alive notification
# message to the service manager every half of the time returned here".
WATCHDOG_FRACTION = 0.5


def socket_address(path: str) -> str | bytes:
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def send(path: str | None, message: str) -> bool:
    """Send one notification datagram; False (never an exception) if it cannot be sent."""
    if not path:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.setblocking(False)
        s.sendto(message.encode("utf-8"), socket_address(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when systemd did not ask for them."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid and wpid.strip() != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000 * WATCHDOG_FRACTION


class NotifyService(service.Service):
    """`ready` is the tree's ReadyService (anything with an `on_ready` list of callables that
    get the App): READY=1 goes out when it fires."""

    log = Logger(namespace="mailappliance.notify")

    def __init__(self, ready: ReadyService, reactor,
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.ready = ready
        self.reactor = reactor
        self.path = env.get("NOTIFY_SOCKET")
        self.interval = watchdog_interval(env, os.getpid())
        self.ping: task.LoopingCall | None = None
        self.sent_stopping = False
        self.pings = 0
        self._trigger = None

    def startService(self) -> None:
        super().startService()
        self.ready.on_ready.append(self._ready)
        if self.path:
            self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown",
                                                               self._stopping)
        if self.interval is not None and self.path:
            self.ping = task.LoopingCall(self._watchdog)
            self.ping.clock = self.reactor
            self.ping.start(self.interval, now=True)

    def _ready(self, app: App) -> None:
        listen = ", ".join(f"{l.kind} {l.address_text()}" for l in app.listeners)
        if send(self.path, f"READY=1\nMAINPID={os.getpid()}\nSTATUS=ready: {listen}"):
            self.log.info("told systemd READY=1")

    def _watchdog(self) -> None:
        if send(self.path, "WATCHDOG=1"):
            self.pings += 1

    def _stopping(self) -> None:
        if not self.sent_stopping:
            self.sent_stopping = True
            send(self.path, "STOPPING=1\nSTATUS=stopping")

    def stopService(self) -> None:
        super().stopService()
        self._stopping()
        if self.ping is not None and self.ping.running:
            self.ping.stop()
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass
            self._trigger = None

