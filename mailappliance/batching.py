"""`Batcher`: one trip to the thread pool at a time, for many items.

Items submitted while a batch is in the pool wait and go together in the next one (up to
`max_batch`; None: all that waits). With light load a batch is one item and nothing waits; under load one thread
does the work of many items, instead of one pool thread per item contending for the GIL (the
dominant cost at high rates: docs/ARCHITECTURE.md, "Threads, the GIL and batches").

    batcher = Batcher(run, max_batch=64)
    d = batcher.submit(item)        # Deferred[outcome of this item]

`run(items)` -> Deferred[list of outcomes, one per item, in order]; an outcome that is an
exception (or Failure) fails that item's Deferred alone, a failed `run` fails them all. The
Deferreds fire in submission order, then the next batch starts, so whatever the callbacks
submitted goes into it.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure


class Batcher:
    def __init__(self, run: Callable[[list], defer.Deferred],
                 max_batch: int | None = 64) -> None:
        self._run = run
        self.max_batch = max_batch
        self._queued: list[tuple[Any, defer.Deferred]] = []
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def submit(self, item: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._queued.append((item, d))
        if not self._running:
            self._next()
        return d

    def _next(self) -> None:
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
