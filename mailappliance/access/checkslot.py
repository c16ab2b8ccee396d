"""The Twisted side of the login penalty's turns (access/penalty.py `begin_check`/`end_check`):
a password check waits for its address's turn with `CheckSlot`, POP3 and SMTP AUTH alike.

    slot = CheckSlot(app.login_penalty, reactor, ip)
    slot.wait().addCallback(run_the_check)     # fires when the turn is ours and the wait over
    ... delay = slot.release(ok)                # True / False / None; answer after `delay`
    slot.abandon()                             # the connection went away before the check ran

The Deferred from wait() never fires after abandon(). A check that has started (its Deferred
fired) must call release() exactly once, even when its connection has gone meanwhile: that is
what hands the turn to the next check in the queue.
"""

from __future__ import annotations

from twisted.internet import defer

from mailappliance.access.penalty import LoginPenalty


class CheckSlot:
    def __init__(self, penalty: LoginPenalty, reactor, ip: str) -> None:
        self.penalty = penalty
        self.reactor = reactor
        self.ip = ip
        self._d: defer.Deferred | None = None
        self._call = None
        self._state = "new"          # new -> queued/granted -> running -> released; abandoned

    def wait(self) -> defer.Deferred:
        """Fires (with None) when this check may run."""
        self._d = defer.Deferred()
        self._state = "queued"
        wait = self.penalty.begin_check(self.ip, self.reactor.seconds(), self)
        if wait is not None:
            self._grant(wait)
        return self._d

    def _grant(self, wait: float) -> None:
        self._state = "granted"
        if wait > 0:
            self._call = self.reactor.callLater(wait, self._run)
        else:
            self._run()

    def _run(self) -> None:
        self._call = None
        self._state = "running"
        self._d.callback(None)

    def release(self, ok: bool | None) -> float:
        """The check is over; returns the seconds to wait before answering a failure."""
        if self._state != "running":
            return 0.0
        self._state = "released"
        delay, nxt = self.penalty.end_check(self.ip, self.reactor.seconds(), ok)
        if nxt is not None:
            nxt[0]._grant(nxt[1])
        return delay

    def abandon(self) -> None:
        """The connection is gone: leave the queue, or give the turn away if it had not run."""
        if self._state not in ("queued", "granted"):
            return
        self._state = "abandoned"
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        nxt = self.penalty.cancel(self.ip, self.reactor.seconds(), self)
        if nxt is not None:
            nxt[0]._grant(nxt[1])
