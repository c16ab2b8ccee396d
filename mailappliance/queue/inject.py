"""The one door into the queue (qmail-queue), as a Twisted adapter over queue/store.py.

SMTP, submission, alias forwards and bounces inject here; the `sendmail` command uses the
blocking `QueueStore.inject` in its own process, which writes the same files.

Durability and speed
--------------------
A message is committed when its file (data, envelope, trailer) is fsynced, renamed from tmp/
into mess/, and mess/ has been fsynced.  The Deferred of `commit()` fires only after all three.

The disk does about 1,000 serial fsyncs a second, and every trip to a pool thread costs thread
wake-ups and GIL hand-overs, so commits go in batches (mailappliance/batching.py): messages that
end while a batch is in the pool go together in the next one, and one pool trip writes all
their files, fsyncs and renames each into mess/, and then fsyncs mess/ once for all of them (a
group commit).  So N concurrent injections cost N file fsyncs plus one directory fsync and one
pool trip, and no Deferred fires before its own rename is durable.

Nothing here blocks the reactor: `write()` only buffers until `FLUSH_BYTES` are pending and
then hands the bytes to a pool thread (one write in flight per message, in order).
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.batching import Batcher
from mailappliance.envelope import Envelope, check_envelope
from mailappliance.queue.naming import message_name
from mailappliance.queue.store import QueueStore, QueueWriteError, TmpMessage

__all__ = ["Injector", "MessageWriter", "QueueWriteError"]

# Bytes buffered in memory before a chunk goes to the tmp file.  128 KiB keeps a message of up
# to 128 KiB (most mail; issue 19 measures 2 KiB and 100 KiB) to one write in the batched
# commit call, with no pool trip of its own while the client sends it, and a 10 MiB message to
# ~80 writes.  Memory stays bounded by the session's MAX_WRITER_BACKLOG (smtp/protocol.py,
# 256 KiB), above which it stops reading from the client.
FLUSH_BYTES = 128 * 1024
# Messages finished in one pool trip at most (see Injector._finish_soon).
MAX_FINISH_BATCH = 64


class MessageWriter:
    """One message being received.  `write()` canonical bytes (LF line ends, no dot-stuffing),
    then `commit()` or `abort()` exactly once."""

    def __init__(self, injector: "Injector") -> None:
        self._injector = injector
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._tmp: TmpMessage | None = None
        self._busy: defer.Deferred | None = None   # the write in flight, if any
        self._error: BaseException | None = None
        self._done = False
        self.size = 0
        self.name: str | None = None               # after commit: the id the log shows

    @property
    def pending_bytes(self) -> int:
        """Bytes held in memory; a producer may pause above a few FLUSH_BYTES."""
        return self._buffered

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise RuntimeError("write after commit/abort")
        if not chunk or self._error is not None:
            return
        self._buffer.append(bytes(chunk))
        self._buffered += len(chunk)
        self.size += len(chunk)
        if self._buffered >= FLUSH_BYTES and self._busy is None:
            self._flush()

    def _take(self) -> bytes:
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        return data

    def _flush(self) -> None:
        data = self._take()
        store, tmp = self._injector.store, self._tmp

        def work() -> TmpMessage:
            t = tmp or store.begin()
            t.write(data)
            return t

        d = self._injector._defer(work)
        self._busy = d

        def done(result):
            self._busy = None
            if isinstance(result, Failure):
                self._error = result.value
                self._buffer, self._buffered = [], 0
            else:
                self._tmp = result
                if self._done:
                    return None
                if self._buffered >= FLUSH_BYTES:
                    self._flush()
            return None

        d.addBoth(done)

    @defer.inlineCallbacks
    def _settle(self):
        while self._busy is not None:
            yield self._busy

    def commit(self, sender: str, recipients: list[str],
               received_from: str | None = None) -> defer.Deferred:
        """-> Deferred[qid], fired once message and envelope are durable in the queue."""
        if self._done:
            raise RuntimeError("commit after commit/abort")
        recipients = list(recipients)
        try:
            check_envelope(sender, recipients)
        except ValueError:
            self.abort()
            raise
        self._done = True
        return self._commit(sender, recipients, received_from)

    def _commit(self, sender, recipients, received_from) -> defer.Deferred:
        # Plain callbacks, no generator: this runs for every message on the reactor thread
        # (issue 19), and a message of up to FLUSH_BYTES has no write in flight to wait for.
        if self._busy is not None:
            return self._settle().addCallback(
                lambda _: self._commit_now(sender, recipients, received_from))
        return self._commit_now(sender, recipients, received_from)

    def _commit_now(self, sender, recipients, received_from) -> defer.Deferred:
        if self._error is not None:
            self._discard_tmp()
            return defer.fail(_as_write_error(self._error))
        data = self._take()
        tmp = self._tmp
        self._tmp = None
        d = self._injector._finish_soon(tmp, data, sender, recipients, received_from)
        return d.addCallbacks(self._finished, self._finish_failed)

    def _finished(self, result) -> int:
        qid, env = result
        self._injector._committed(qid, env)
        # The id the SMTP 250 shows, the same as the log's (naming.message_name).
        self.name = message_name(qid, env.token)
        return qid

    def _finish_failed(self, failure: Failure):
        self._injector.stats["write_errors"] += 1
        return Failure(_as_write_error(failure.value))

    def abort(self) -> None:
        """Forget the message; a tmp file already written is removed (off the reactor)."""
        if self._done:
            return
        self._done = True
        self._buffer, self._buffered = [], 0

        @defer.inlineCallbacks
        def later():
            yield self._settle()
            self._discard_tmp()

        later()

    def _discard_tmp(self) -> None:
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            self._injector._defer(tmp.discard).addErrback(lambda f: None)


def _as_write_error(e: BaseException) -> BaseException:
    if isinstance(e, (QueueWriteError, ValueError)):
        return e
    if isinstance(e, OSError):
        return QueueWriteError(f"queue write failed: {e.strerror or e}")
    return QueueWriteError(f"queue write failed: {e!r}")


class Injector:
    """Injector(queue_store, reactor, threadpool, on_commit=callable(qid)).

    `on_commit_envelope=callable(envelope)` instead hands over the Envelope as written (with
    its qid and recipient offsets), so the queue manager can start delivery without reading
    the file back."""

    log = Logger()

    def __init__(self, queue_store: QueueStore, reactor, threadpool,
                 on_commit: Callable[[int], object] | None = None,
                 on_commit_envelope: Callable[[Envelope], object] | None = None) -> None:
        self.store = queue_store
        self.reactor = reactor
        self.threadpool = threadpool
        self.on_commit = on_commit
        self.on_commit_envelope = on_commit_envelope
        # batched commits: messages whose last bytes, envelope and fsyncs wait for a pool trip
        self._finisher = Batcher(lambda items: self._defer(self._finish_many, items),
                                 max_batch=MAX_FINISH_BATCH)
        self.stats = {"commits": 0, "dir_syncs": 0, "write_errors": 0}

    def _defer(self, f, *args) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.threadpool, f, *args)

    def begin(self) -> MessageWriter:
        return MessageWriter(self)

    def inject(self, message: bytes, sender: str, recipients: list[str],
               received_from: str | None = None) -> defer.Deferred:
        w = self.begin()
        w.write(message)
        return w.commit(sender, recipients, received_from)

    # -- batched finishes ---------------------------------------------------------------------------
    def _finish_soon(self, tmp: TmpMessage | None, data: bytes, sender: str,
                     recipients: list[str], received_from: str | None) -> defer.Deferred:
        """-> Deferred[(qid, envelope)] once the message is committed: its file written,
        fsynced and renamed into mess/, and mess/ fsynced.

        Messages that end while a batch is in the pool go together in the next one
        (mailappliance/batching.py): one pool trip writes all their files, starts the kernel's
        writeback of all of them (FileOps.start_writeback), fsyncs and renames them one by
        one, then fsyncs mess/ once for the whole batch."""
        return self._finisher.submit((tmp, data, sender, recipients, received_from))

    def _finish_many(self, items: list[tuple]) -> list:
        """In a pool thread: each message's (qid, envelope), or the exception it met.

        Three calls into FileOps for the whole batch, each of which the C helper makes with
        the GIL released once: create the tmp/ files of messages that have none yet, then
        (after the envelopes are encoded) write, fsync and rename every file and fsync mess/
        (QueueStore.complete_many)."""
        store = self.store
        out: list = [None] * len(items)
        fresh = iter(store.begin_many(sum(1 for item in items if item[0] is None)))
        finished: list[tuple[int, TmpMessage]] = []
        for k, (tmp, data, sender, recipients, received_from) in enumerate(items):
            t = tmp or next(fresh)
            if isinstance(t, BaseException):
                out[k] = t
                continue
            try:
                t.finish(sender, recipients, received_from, data=data, write=False)
                finished.append((k, t))
            except BaseException as e:      # noqa: BLE001 - this message only
                out[k] = e
        results = store.complete_many([t for _k, t in finished])
        if finished:
            self.stats["dir_syncs"] += 1
        for (k, t), r in zip(finished, results):
            out[k] = r if isinstance(r, BaseException) else (r, t.envelope)
        return out

    def _committed(self, qid: int, env: Envelope) -> None:
        """On the reactor thread, before commit()'s Deferred fires: tell the queue manager."""
        self.stats["commits"] += 1
        try:
            if self.on_commit is not None:
                self.on_commit(qid)
            if self.on_commit_envelope is not None:
                self.on_commit_envelope(env)
        except Exception:
            self.log.failure("on_commit({qid}) failed", qid=qid)
