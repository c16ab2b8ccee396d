"""A synchronous thread pool and a reactor that runs callFromThread at once.

`deferToThreadPool(reactor, pool, f)` then runs `f` inline and fires its Deferred before
returning, so adapter tests of thread-pool users (the injector, deliverers) need no threads and
no sleeps.  `DeferredThreadPool` instead holds the calls until the test runs them, to test
ordering and overlap (group commit) deterministically.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure


class ImmediateThreadPool:
    """`callInThreadWithCallback` runs the call now, in the calling thread."""

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None],
                                 func: Callable, *args, **kw) -> None:
        self.calls += 1
        try:
            result = func(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    def callInThread(self, func: Callable, *args, **kw) -> None:
        func(*args, **kw)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class DeferredThreadPool(ImmediateThreadPool):
    """Queues calls; `run_one()` / `run_all()` executes them in FIFO order."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: deque = deque()

    def callInThreadWithCallback(self, onResult, func, *args, **kw) -> None:
        self.pending.append((onResult, func, args, kw))

    def run_one(self) -> bool:
        if not self.pending:
            return False
        onResult, func, args, kw = self.pending.popleft()
        ImmediateThreadPool.callInThreadWithCallback(self, onResult, func, *args, **kw)
        return True

    def run_all(self, limit: int = 10_000) -> int:
        n = 0
        while self.pending and n < limit:
            self.run_one()
            n += 1
        return n


class ThreadlessReactor(MemoryReactorClock):
    """MemoryReactorClock plus `callFromThread`, which calls at once (there are no threads)."""

    def callFromThread(self, f: Callable, *args, **kw) -> None:
        f(*args, **kw)

    def getThreadPool(self):  # pragma: no cover - not used by our code
        return ImmediateThreadPool()
