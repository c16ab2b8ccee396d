"""`Batcher`: one trip to the thread pool at a time, for many items.

Items submitted while a batch is in the pool wait and go together in the next one (up to
`max_batch`; None: all that waits). With light load a batch is one item and nothing waits;
under load one thread does the work of many items, instead of one pool thread per item
contending for the GIL (the dominant cost at high rates: docs/ARCHITECTURE.md, "Threads, the
GIL and batches").

    batcher = Batcher(run, max_batch=64)
    d = batcher.submit(item)        # Deferred[outcome of this item]

A gathering window (`window` seconds, on `clock`, an IReactorTime): an item that finds the
Batcher idle waits up to `window` for company before its trip starts, unless `max_batch` items
are already waiting (then they go at once). Meant for work that is off the client's critical
path (Maildir deliveries, queue-file removals after the 250): at one SMTP session each message
arrives alone, and without the window every message costs its own pool trip and its own
directory fsync. Items that arrive while a trip runs go together right after it, as without a
window. `flush()` starts the waiting items now (stop, drain).

`run(items)` -> Deferred[list of outcomes, one per item, in order]; an outcome that is an
exception (or Failure) fails that item's Deferred alone, a failed `run` fails them all. The
Deferreds fire in submission order, then the next batch starts, so whatever the callbacks
submitted goes into it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure


class Batcher:
    def __init__(self, run: Callable[[list], defer.Deferred],
                 max_batch: int | None = 64, *, window: float = 0.0,
                 clock: IReactorTime | None = None) -> None:
        if window > 0 and clock is None:
            raise ValueError("a gathering window needs a clock")
        self._run = run
        self.max_batch = max_batch
        self.window = window
        self.clock = clock
        self._queued: list[tuple[Any, defer.Deferred]] = []
        self._running = False
        self._timer: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        return self._running

    def submit(self, item: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._queued.append((item, d))
        if self._running:
            return d
        if self.window > 0 and (self.max_batch is None or len(self._queued) < self.max_batch):
            if self._timer is None:
                self._timer = self.clock.callLater(self.window, self._window_over)
        else:
            self._next()
        return d

    @property
    def gathering(self) -> bool:
        """Items wait for the window to end."""
        return self._timer is not None

    def flush(self) -> None:
        """Start the items waiting in the window now (nothing to do while a trip runs: its
        end starts the next)."""
        if not self._running and self._queued:
            self._next()

    def _window_over(self) -> None:
        self._timer = None
        self.flush()

    def _next(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self.max_batch is None:
            batch, self._queued = self._queued, []
        else:
            batch = self._queued[:self.max_batch]
            self._queued = self._queued[self.max_batch:]
        self._running = True
        d = defer.maybeDeferred(self._run, [item for item, _ in batch])
        d.addBoth(self._done, batch)

    def _done(self, outcomes, batch) -> None:
        self._running = False
        for k, (_item, d) in enumerate(batch):
            out = outcomes if isinstance(outcomes, Failure) else outcomes[k]
            if isinstance(out, (Failure, BaseException)):
                d.errback(out)
            else:
                d.callback(out)
        if self._queued and not self._running:
            self._next()
