"""Graceful stop (SIGTERM): stop accepting, let transfers finish or answer 421, bounded.

make_service builds one `Drain(reactor)` (`app.drain`) and makes its `start` an `app.stop_hooks`
entry. The order, run by the service tree's root (service.AppService) when twistd stops:

1. every listener stops accepting (its port is closed);
2. `Drain.start()` (an `app.stop_hooks` entry): every registered session that is idle is told
   to close now (SMTP answers ``421 <host> Service not available, closing transmission
   channel``); a session in the middle of a DATA transfer or a queue commit keeps going and is
   told to close as soon as it is idle again (after its 250 or 451); whatever is still busy
   after `DRAIN_TIMEOUT` seconds is told to close anyway (its message was not acknowledged, so
   nothing is lost: the client retries later);
3. the other services stop: the queue manager, deliveries in flight, and last the thread pool,
   whose stop waits for running Maildir and queue writes to finish.

A protocol takes part like this (the interface; docs/ARCHITECTURE.md repeats it)::

    self.drain = app.drain.register(self.close_now)   # connectionMade
    self.drain.busy()      # DATA started (or a commit is in flight)
    self.drain.idle()      # the reply to it was sent; closes at once if the server stops
    self.drain.done()      # connectionLost
    app.drain.stopping     # True once the stop began: refuse new work with 421

`close_now()` must send the final reply and close (abortConnection after a short flush is
fine); it may be called more than once and after connectionLost.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

# Seconds sessions in DATA get to finish after SIGTERM. systemd waits TimeoutStopSec (90 s by
# default) before SIGKILL; 30 s for transfers leaves the rest for the queue and thread pool.
# RFC 5321 4.5.3.2.6 lets a client wait 10 minutes for the reply to DATA's end, so a slow
# transfer may be cut: it was never acknowledged and the client will retry.
DRAIN_TIMEOUT = 30.0
# After the sessions were told to close, how long their connections get to go away.
CLOSE_GRACE = 5.0


class SessionHandle:
    def __init__(self, drain: "Drain", close: Callable[[], None]) -> None:
        self._drain = drain
        self._close = close
        self.is_busy = False
        self.closing = False
        self.finished = False

    def busy(self) -> None:
        self.is_busy = True

    def idle(self) -> None:
        self.is_busy = False
        if self._drain.stopping:
            self.close()

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            self._drain._unregister(self)

    def close(self) -> None:
        if self.closing or self.finished:
            return
        self.closing = True
        try:
            self._close()
        except Exception:
            Drain.log.failure("drain: closing a session failed")


class Drain:
    log = Logger(namespace="mailappliance.drain")

    def __init__(self, reactor, timeout: float = DRAIN_TIMEOUT,
                 close_grace: float = CLOSE_GRACE) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.close_grace = close_grace
        self.sessions: set[SessionHandle] = set()
        self.stopping = False
        self._all_gone: defer.Deferred | None = None
        self._calls: list = []

    def register(self, close: Callable[[], None]) -> SessionHandle:
        handle = SessionHandle(self, close)
        self.sessions.add(handle)
        if self.stopping:
            handle.close()
        return handle

    def _unregister(self, handle: SessionHandle) -> None:
        self.sessions.discard(handle)
        if self.stopping and not self.sessions and self._all_gone is not None:
            d, self._all_gone = self._all_gone, None
            self._cancel_calls()
            d.callback(None)

    def _cancel_calls(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []

    def start(self) -> defer.Deferred:
        """Begin the drain; fires when every session is gone, or at the time bound."""
        self.stopping = True
        busy = [s for s in self.sessions if s.is_busy]
        self.log.info("stopping: closing {idle} idle sessions, waiting up to {t:.0f} s for "
                      "{busy} transfers", idle=len(self.sessions) - len(busy), busy=len(busy),
                      t=self.timeout)
        for s in list(self.sessions):
            if not s.is_busy:
                s.close()
        if not self.sessions:
            return defer.succeed(None)
        self._all_gone = defer.Deferred()
        self._calls.append(self.reactor.callLater(self.timeout, self._deadline))
        return self._all_gone

    def _deadline(self) -> None:
        left = [s for s in self.sessions if not s.closing]
        if left:
            self.log.warn("stopping: {n} transfers did not finish within {t:.0f} s; "
                          "closing them with 421 (not acknowledged, the clients retry)",
                          n=len(left), t=self.timeout)
        for s in left:
            s.close()
        self._calls.append(self.reactor.callLater(self.close_grace, self._give_up))

    def _give_up(self) -> None:
        if self._all_gone is not None:
            d, self._all_gone = self._all_gone, None
            self.log.warn("stopping: {n} connections still open, the reactor closes them",
                          n=len(self.sessions))
            d.callback(None)

