"""The queue directory: qmail-queue's files, written by this module and nobody else.

A store: blocking file I/O, no Twisted. Adapters call it from a thread pool; the `sendmail`
command calls it directly.  Names and the layout are in naming.py, the envelope codec in
mailappliance/envelope.py, the system calls (and their batches) in mailappliance/fileops.py.

Layout under ``<data>/queue``::

    tmp/<k>/<time>.<pid>.<seq>.<rand>  an injection in progress (never looked at by delivery);
                                    k is per writer thread: concurrent creates and fsyncs in
                                    one directory contend (naming.TMP_SPLIT)
    mess/<N>                        a committed message; N is its inode number, like qmail's
                                    queue ids, so ids are unique across processes for free
    bounce/<N>                      failure reports of message N, appended before the
                                    recipient is marked failed (qmail's bounce/ directory)
    corrupt/<N>                     entries that could not be parsed, moved aside with a log line
    defer/<N>                       what `queue list` shows of deferred recipients: attempts, last
                                    try, last deferral text (qmail keeps none; Postfix's defer/)
    free/<N>                        files of finished messages kept for reuse (the running
                                    server's store only, see "Recycling" below)
    trigger                         unix datagram socket of the running manager (qmail's
                                    lock/trigger): injectors poke it, delivery starts at once

One message is one file: ``message bytes | envelope | trailer``.  The message part is the
canonical stored form (lines end in LF, no dot-stuffing).  The envelope and trailer are
mailappliance/envelope.py's records: length-prefixed, so CR, LF or NUL inside an address
cannot start a new record, and checksummed, so a truncated or damaged file is recognised.

Per-recipient state lives in the envelope's status bytes, as qmail-send keeps ``T``/``D``
marks in its local/ and remote/ files: ``T`` to do, ``D`` delivered, ``F`` failed (its bounce
record is already on disk).  A mark is one byte written in place and fdatasync'ed, so a crash
after three of five deliveries redelivers only the other two.

The commit point is one rename: ``tmp/x`` -> ``mess/N`` after the file (data, envelope,
trailer) has been fsynced; the rename is durable once ``mess/`` itself is fsynced.  The
adapter (inject.py) groups that directory fsync over every rename that finished before it
started, so concurrent injections share one; `inject()` here does all steps for one message.

The time a message should next be tried is kept as the mtime of its file (qmail-send keeps
it as the mtime of the info file); losing it in a crash only means an earlier retry.

Recycling: the running server's store (``recycle=True``) does not unlink a finished message
of at most RECYCLE_MAX bytes but renames it into ``free/`` (at most FREE_MAX files), and the
next injection overwrites such a file in place, truncates it to its new length, fsyncs it and
renames it into ``mess/`` exactly as a new file.  Nothing about the commit changes; what is
saved is an inode and a block allocated and freed per message (on ext4 without a journal each
new inode is found by skipping every inode freed in the last minute or more, which at a few
hundred messages a second cost a sixth of the server's CPU).  The id of a recycled file comes
back at once, as an unlinked inode's may on any file system: tokens tell the messages apart
(the manager's `_clash`).  A crash at any point leaves a free/ file that is not a message, or
the message in mess/ as before.  Only the server recycles: the sendmail command and the store
commands (other processes) never touch free/.

`QueueStore` is the deliverers' message source (delivery/interfaces.py IMessageSource): the
queue manager hands it to them with each delivery, so they read a message without importing
the queue.
"""

from __future__ import annotations

import collections
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from zope.interface import implementer

from mailappliance.delivery.interfaces import IMessageReader, IMessageSource
from mailappliance.envelope import (
    DELIVERED, FAILED, MAX_ENVELOPE, MAX_FIELD, STATES, TODO, TRAILER_SIZE, CorruptEntry,
    Envelope, Recipient, check_envelope, decode_bounce_records, decode_envelope,
    encode_bounce_record, encode_envelope, make_trailer, parse_trailer, status_positions)
from mailappliance.fileops import FileOps, write_all
from mailappliance.queue import naming
from mailappliance.queue.naming import (BOUNCE, CORRUPT, DEFER, FREE, MESS, TMP, TMP_SPLIT,
                                        TRIGGER)

# --- limits ----------------------------------------------------------------------------------

# qmail-clean removes leftovers of injections that never completed after 36 hours
# (qmail-send.c: "if (st.st_mtime + 129600 < recent)").
TMP_MAX_AGE = 36 * 60 * 60
# Messages up to this size stay in memory for their first delivery, up to this many bytes in all
# (QueueStore.keep_data).  The same as inject.FLUSH_BYTES: every message written by its commit
# alone can be delivered without reading it back (a 100 KiB message included).
KEEP_DATA_MAX = 128 * 1024
KEEP_DATA_TOTAL = 16 * 1024 * 1024
# Bytes read at a time when handing a message to a deliverer.
READ_CHUNK = 64 * 1024
# A defer/<N> file holds one record per deferred recipient (at most MAX_RECIPIENTS-ish of
# them, each text cut to DEFER_TEXT_MAX); reading stops at this size, which no real file
# reaches (1,000 recipients x 1 KB).
DEFER_FILE_MAX = 4 * 1024 * 1024
DEFER_TEXT_MAX = 1000
# changed_since looks this much further back than asked: file times come from the kernel's
# clock, which may lag time.time() by a clock tick (and a coarse-grained file system by more).
CTIME_SLACK = 2.0
# `queue show` shows at most this much of a message's header.
SHOW_HEADER_MAX = 64 * 1024
# Recycling (see the module's docstring): messages up to this size leave their file in free/
# (KEEP_DATA_MAX: a 100 KiB message included), at most this many files (so free/ holds at
# most 32 MiB plus envelopes; a few hundred are enough for the removals and injections of one
# moment to meet).
RECYCLE_MAX = 128 * 1024
FREE_MAX = 256


class QueueWriteError(Exception):
    """The message could not be committed; nothing of it is visible in the queue.

    SMTP answers ``451 qq write error or disk full (#4.3.0)``; sendmail exits 75.
    """


# --- the store -------------------------------------------------------------------------------

class TmpMessage:
    """An injection in progress: a file in tmp/ that only its writer knows about."""

    def __init__(self, store: "QueueStore", path: str, fd: int, token: str,
                 ino: int | None = None, reused: bool = False) -> None:
        self.store = store
        self.path = path
        self.fd = fd
        self.token = token
        self.ino = ino                           # known when created by create_many
        self.reused = reused                     # a free/ file: truncated before the fsync
        self.file_size = -1                      # known after finish()
        self.size = 0
        self.closed = False
        self.envelope: Envelope | None = None    # set by finish()
        self._unsynced = False                   # finish(write=False) done, commit due
        self._tail: bytes | None = None          # finish(write=False): bytes still to write

    def write(self, data: bytes) -> None:
        if self.closed:
            raise QueueWriteError("write after close")
        try:
            write_all(self.store.ops, self.fd, data)
        except OSError as e:
            self.discard()
            raise QueueWriteError(f"queue write failed: {e.strerror or e}") from e
        self.size += len(data)

    def finish(self, sender: str, recipients: list[str], received_from: str | None = None,
               *, qp: int | None = None, uid: int | None = None,
               birth: float | None = None, data: bytes = b"", write: bool = True) -> int:
        """Write `data` (the last part of the message), envelope and trailer in one write,
        fsync, rename into mess/.  Returns the queue id.

        With ``write=False`` it stops before the write: `QueueStore.complete_many` then
        writes, fsyncs and renames a whole batch of finishes and fsyncs mess/ once, in one
        FileOps call (the group commit).  Otherwise (the sendmail command's
        `QueueStore.inject`) the rename is durable only after `QueueStore.sync()`."""
        if self.closed:
            raise QueueWriteError("finish after close")
        ops = self.store.ops
        try:
            check_envelope(sender, recipients)
        except ValueError:
            self.discard()
            raise
        if received_from is not None and (len(received_from) > MAX_FIELD):
            received_from = received_from[:MAX_FIELD]
        try:
            ino = self.ino if self.ino is not None else os.fstat(self.fd).st_ino
            env = Envelope(sender=sender,
                           recipients=[Recipient(i, a) for i, a in enumerate(recipients)],
                           birth=self.store.clock() if birth is None else birth,
                           received_from=received_from,
                           qp=ino if qp is None else qp,
                           uid=naming.uid() if uid is None else uid,
                           token=self.token)
            envelope = encode_envelope(env)
            if len(envelope) > MAX_ENVELOPE:
                raise QueueWriteError("envelope too large")
            self.size += len(data)
            positions = status_positions(envelope)
            trailer = make_trailer(self.size, envelope, positions)
            self.file_size = self.size + len(envelope) + len(trailer)
            if write:
                write_all(ops, self.fd, b"".join((data, envelope, trailer)))
                self._sync_and_rename(ino)
            else:
                self._tail = b"".join((data, envelope, trailer))
        except OSError as e:
            self.discard()
            raise QueueWriteError(f"queue write failed: {e.strerror or e}") from e
        except QueueWriteError:
            self.discard()
            raise
        # What a reader of the file would see, so the manager need not read it back.
        env.qid, env.size = ino, self.size
        env.bounce_file = False
        if len(data) == self.size:
            env.data = data     # the whole message: QueueStore.keep_data decides whether to keep it
        for rcpt, pos in zip(env.recipients, positions):
            rcpt.offset = self.size + pos
        self.envelope = env
        self._unsynced = not write
        return ino

    def _sync_and_rename(self, ino: int) -> None:
        ops = self.store.ops
        if self.reused:
            ops.truncate(self.fd, self.file_size)
        ops.fsync(self.fd)
        ops.close(self.fd)
        self.closed = True
        ops.rename(self.path, os.path.join(self.store.mess_dir, str(ino)))

    def _commit_item(self) -> tuple:
        """The FileOps.commit_many item of an unsynced finish."""
        if self.closed or not self._unsynced:
            raise QueueWriteError("complete without an unsynced finish")
        return (self.fd, self._tail, self.path,
                os.path.join(self.store.mess_dir, str(self.envelope.qid)),
                self.file_size if self.reused else -1)      # -1: a new file, no truncate

    def _committed(self, err) -> int:
        """Take commit_many's result for this message: its qid, or raise QueueWriteError
        (the tmp/ file removed, nothing visible)."""
        self._tail = None
        if err is None:
            self.closed = True
            self._unsynced = False
            return self.envelope.qid
        step, e = err
        if step not in ("write", "fsync"):
            self.closed = True          # the fd is already closed
        self.discard()
        raise QueueWriteError(f"queue write failed: {e.strerror or e}")

    def discard(self) -> None:
        """Abort: close and remove the tmp (or reused free/) file; nothing of it was ever
        visible."""
        if not self.closed:
            self.closed = True
            try:
                self.store.ops.close(self.fd)
            except OSError:
                pass
        try:
            self.store.ops.unlink(self.path)
        except OSError:
            pass


@implementer(IMessageReader)
class MessageReader:
    """The message part of a queue file (not the envelope), read in chunks."""

    def __init__(self, path: str, size: int) -> None:
        self._f = open(path, "rb")
        self._left = size
        self.size = size

    def read(self, n: int = READ_CHUNK) -> bytes:
        if self._left <= 0:
            return b""
        data = self._f.read(min(n, self._left))
        if not data:
            raise CorruptEntry("message shorter than its trailer says")
        self._left -= len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self.read()
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "MessageReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class RecipientInfo:
    """One recipient as `queue list` and `queue show` describe it."""
    index: int
    address: str
    state: str                       # "todo", "done" or "failed"
    attempts: int = 0                # deferred attempts so far (defer/<N>)
    last_try: float | None = None    # time of the last deferred attempt
    last_error: str | None = None    # its text: host and reply, or the connection error
    failure: str | None = None       # for a failed recipient: the text its bounce will carry


@dataclass
class QueueEntry:
    """What `list` shows to the admin."""
    qid: int
    birth: float
    size: int
    sender: str
    recipients: list[tuple[str, str]] = field(default_factory=list)  # (address, state)
    next_try: float = 0.0
    name: str = ""                                   # naming.message_name: the log's id
    details: list[RecipientInfo] = field(default_factory=list)
    received_from: str | None = None


@implementer(IMessageSource)
class QueueStore:
    def __init__(self, queue_dir: Path | str, *, clock: Callable[[], float] = time.time,
                 ops: FileOps | None = None, recycle: bool = False) -> None:
        self.dir = str(queue_dir)
        self.clock = clock
        self.ops = ops or FileOps()
        self.tmp_dir = os.path.join(self.dir, TMP)
        self.mess_dir = os.path.join(self.dir, MESS)
        self.bounce_dir = os.path.join(self.dir, BOUNCE)
        self.corrupt_dir = os.path.join(self.dir, CORRUPT)
        self.trigger_path = os.path.join(self.dir, TRIGGER)
        self.defer_dir = os.path.join(self.dir, DEFER)
        for d in (self.dir, self.tmp_dir, self.mess_dir, self.bounce_dir, self.corrupt_dir,
                  self.defer_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.tmp_dirs = [os.path.join(self.tmp_dir, str(k)) for k in range(TMP_SPLIT)]
        for d in self.tmp_dirs:
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.kept_bytes = 0
        self._holding = False
        # Recycling (module docstring): ids of the files in free/; deque operations are safe
        # across the pool threads that remove and inject.
        self.recycle = recycle
        self.free_dir = os.path.join(self.dir, FREE)
        self._free: collections.deque[int] = collections.deque()
        if recycle:
            os.makedirs(self.free_dir, mode=0o700, exist_ok=True)
            self._load_free()

    def _load_free(self) -> None:
        """Take the free/ files left by the last run (at most FREE_MAX; the rest go).

        A name that is also linked elsewhere is dropped, never reused: after a crash on a
        file system without a journal, free/ may still show a file that was taken and
        renamed into mess/ before it (only mess/ was fsynced), so the inode is a message."""
        for name in sorted(os.listdir(self.free_dir)):
            path = os.path.join(self.free_dir, name)
            try:
                linked = os.lstat(path).st_nlink != 1 or os.path.lexists(
                    os.path.join(self.mess_dir, name))
            except FileNotFoundError:
                continue
            if name.isdigit() and not linked and len(self._free) < FREE_MAX:
                self._free.append(int(name))
            else:
                self._unlink_quietly(path)        # the name only: a message keeps its own

    def free_count(self) -> int:
        return len(self._free)

    # -- message bytes kept in memory for the first deliveries ------------------------------------
    # A message the server just received is delivered at once; keeping its bytes (when small)
    # spares that delivery an open, fstat, read and close of the queue file in a pool thread.
    # Called on the reactor thread only; the total is capped, so a backlog costs no memory.
    def keep_data(self, env: Envelope) -> None:
        data = env.data
        if data is None:
            return
        if len(data) > KEEP_DATA_MAX or self.kept_bytes + len(data) > KEEP_DATA_TOTAL:
            env.data = None
            return
        self.kept_bytes += len(data)

    def release_data(self, env: Envelope) -> None:
        data, env.data = env.data, None
        if data is not None:
            self.kept_bytes = max(0, self.kept_bytes - len(data))

    # -- injection ------------------------------------------------------------------------------
    def _tmp_path(self) -> str:
        """A new name in this thread's tmp/ shard: <time>.<pid>.<seq>.<random>."""
        return os.path.join(self.tmp_dirs[naming.tmp_shard()], naming.tmp_name(self.clock()))

    def begin(self) -> TmpMessage:
        if self._free:
            r = self.begin_many(1)[0]
            if isinstance(r, QueueWriteError):
                raise r
            return r
        path = self._tmp_path()
        token = os.path.basename(path)
        try:
            fd = self.ops.open_excl(path)
        except OSError as e:
            raise QueueWriteError(f"queue write failed: {e.strerror or e}") from e
        return TmpMessage(self, path, fd, token)

    def begin_many(self, n: int) -> list:
        """`n` injections at once (one call into FileOps.create_many): per injection a
        TmpMessage that already knows its queue id, or the QueueWriteError it met.
        Files in free/ are taken first (recycling); one that cannot be opened is replaced
        by a new file."""
        out: list = []
        reuse: list[str] = []
        while len(reuse) < n:
            try:
                reuse.append(os.path.join(self.free_dir, str(self._free.popleft())))
            except IndexError:
                break
        if reuse:
            for path, r in zip(reuse, self.ops.create_many(reuse, create=False)):
                if isinstance(r, OSError):
                    self._unlink_quietly(path)
                else:
                    out.append(TmpMessage(self, path, r[0], naming.tmp_name(self.clock()),
                                          ino=r[1], reused=True))
        paths = [self._tmp_path() for _ in range(n - len(out))]
        for path, r in zip(paths, self.ops.create_many(paths)):
            if isinstance(r, OSError):
                out.append(QueueWriteError(f"queue write failed: {r.strerror or r}"))
            else:
                out.append(TmpMessage(self, path, r[0], os.path.basename(path), ino=r[1]))
        return out

    def complete_many(self, tmps: list[TmpMessage]) -> list:
        """The group commit of finishes done with ``write=False``: writes what is left,
        fsyncs, renames into mess/ and fsyncs mess/ once, all in one FileOps.commit_many
        call. -> per message its qid or the QueueWriteError it met (its tmp/ file removed).
        If the directory fsync fails no rename is known durable: every message of the batch
        is withdrawn from mess/ and fails."""
        if not tmps:
            return []
        try:
            self._hold()
        except OSError:
            pass            # mess/ cannot be opened: its fsync below fails and says why
        try:
            errs, (derr,) = self.ops.commit_many([t._commit_item() for t in tmps],
                                                 [self.mess_dir])
        except Exception as e:      # noqa: BLE001 - state unknown: all fail, nothing claimed
            # The call may have failed before or after its system calls (a bad argument, or
            # no memory for the results). Its descriptors may be closed and their numbers
            # reused by now, so they are left alone (at worst a leak); the tmp/ names go. A
            # message already renamed into mess/ is then delivered although its client was
            # told 451: a duplicate when the client retries, never a loss.
            for t in tmps:
                t._tail = None
                t.closed = True
                t.discard()
            return [e if isinstance(e, QueueWriteError)
                    else QueueWriteError(f"queue write failed: {e}")] * len(tmps)
        out: list = []
        for t, err in zip(tmps, errs):
            try:
                out.append(t._committed(err))
            except QueueWriteError as e:
                out.append(e)
        if derr is not None:
            failure = QueueWriteError(f"queue sync failed: {derr.strerror or derr}")
            for k, r in enumerate(out):
                if not isinstance(r, BaseException):
                    self._unlink_quietly(self.message_path(r))
                    out[k] = failure
        return out

    def _hold(self) -> None:
        if not self._holding:
            self.ops.hold_dir(self.mess_dir)
            self._holding = True

    def sync(self) -> None:
        """Make every rename into mess/ that has returned so far durable (commit point)."""
        try:
            self._hold()
            self.ops.fsync_dir(self.mess_dir)
        except OSError as e:
            raise QueueWriteError(f"queue sync failed: {e.strerror or e}") from e

    def inject(self, message: bytes, sender: str, recipients: list[str],
               received_from: str | None = None, *, trigger: bool = True) -> int:
        """The blocking door (sendmail command): returns the queue id once durable."""
        check_envelope(sender, list(recipients))
        tmp = self.begin()
        qid = tmp.finish(sender, list(recipients), received_from, data=message)
        try:
            self.sync()
        except QueueWriteError:
            # The rename happened but is not known durable: withdraw it, so a caller who
            # hears "failed" never also gets the message delivered.
            self._unlink_quietly(os.path.join(self.mess_dir, str(qid)))
            raise
        if trigger:
            self.pull_trigger(qid)
        return qid

    def pull_trigger(self, qid: int | None = None) -> None:
        """Tell a running manager to look (qmail-queue writes a byte to lock/trigger): at
        message `qid` (b"!<qid>"), or at the whole directory (b"!")."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.sendto(b"!" + (b"%d" % qid if qid is not None else b""), self.trigger_path)
        except OSError:
            pass  # nobody listening: the periodic scan will find it
        finally:
            s.close()

    # -- reading ----------------------------------------------------------------------------------
    def message_path(self, qid: int) -> str:
        return os.path.join(self.mess_dir, str(int(qid)))

    def list_ids(self) -> list[int]:
        out = []
        for name in os.listdir(self.mess_dir):
            if name.isdigit():
                out.append(int(name))
        out.sort()
        return out

    def count(self) -> int:
        """How many messages mess/ holds (one pass, no list)."""
        with os.scandir(self.mess_dir) as it:
            return sum(1 for e in it if e.name.isdigit())

    def scan(self) -> Iterator[tuple[int, float, float]]:
        """Every message of mess/ as (qid, mtime: its next try, ctime), in directory order and
        lazily: one pass over the directory however long it is, a stat per file (the queue
        manager's load reads it in batches from a thread, one batch at a time)."""
        with os.scandir(self.mess_dir) as it:
            for e in it:
                if e.name.isdigit():
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    yield int(e.name), st.st_mtime, st.st_ctime

    def changed_since(self, since: float | None) -> list[int]:
        """Ids of the messages whose file changed (ctime: created, renamed, marked, utime'd)
        at or after wall-clock time `since` less CTIME_SLACK (all with None): the queue
        manager's periodic look for messages committed by another process."""
        if since is None:
            return [qid for qid, _m, _c in self.scan()]
        since -= CTIME_SLACK
        return [qid for qid, _m, ctime in self.scan() if ctime >= since]

    def read_envelope(self, qid: int) -> Envelope:
        path = self.message_path(qid)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size < TRAILER_SIZE:
                raise CorruptEntry("file shorter than a trailer")
            f.seek(st.st_size - TRAILER_SIZE)
            msg_len, env_len, crc = parse_trailer(f.read(TRAILER_SIZE))
            if env_len > MAX_ENVELOPE or msg_len + env_len + TRAILER_SIZE != st.st_size:
                raise CorruptEntry("lengths in trailer do not match the file")
            f.seek(msg_len)
            raw = f.read(env_len)
        env = decode_envelope(raw, crc, base_offset=msg_len)
        env.qid = int(qid)
        env.size = msg_len
        return env

    def open_message(self, env: Envelope) -> MessageReader:
        return MessageReader(self.message_path(env.qid), env.size)

    def read_message(self, env: Envelope) -> bytes:
        data = env.data
        if data is not None:
            return data
        with self.open_message(env) as r:
            return b"".join(r)

    # -- per-recipient state ----------------------------------------------------------------------
    def mark(self, env: Envelope, marks: list[tuple[int, bytes]]) -> None:
        """Set recipient states in place and fdatasync: after return the marks survive a crash."""
        if not marks:
            return
        for _i, state in marks:
            if state not in STATES:
                raise ValueError("bad state")
        fd = os.open(self.message_path(env.qid), os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            for index, state in marks:
                os.pwrite(fd, state, env.recipients[index].offset)
            os.fdatasync(fd) if hasattr(os, "fdatasync") else os.fsync(fd)
        finally:
            os.close(fd)
        for index, state in marks:
            env.recipients[index].state = state

    def add_failure(self, env: Envelope, index: int, text: str) -> None:
        """Record why recipient `index` failed, durably, then mark it FAILED."""
        rcpt = env.recipients[index]
        env.bounce_file = True
        path = os.path.join(self.bounce_dir, str(env.qid))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        try:
            if os.fstat(fd).st_size == 0:
                new = True
            else:
                new = False
            write_all(self.ops, fd, encode_bounce_record(env.token, index, rcpt.address, text))
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            self.ops.fsync_dir(self.bounce_dir)
        self.mark(env, [(index, FAILED)])

    def failures(self, env: Envelope) -> dict[int, tuple[str, str]]:
        """index -> (address, text) for this message's recorded failures."""
        try:
            with open(os.path.join(self.bounce_dir, str(env.qid)), "rb") as f:
                raw = f.read(MAX_ENVELOPE)
        except FileNotFoundError:
            return {}
        return decode_bounce_records(raw, env.token)

    # -- scheduling hint --------------------------------------------------------------------------
    def set_next_try(self, qid: int, when: float) -> None:
        try:
            os.utime(self.message_path(qid), (when, when))
        except OSError:
            pass  # only a hint

    def next_try(self, qid: int) -> float:
        return os.stat(self.message_path(qid)).st_mtime

    # -- removal ---------------------------------------------------------------------------------
    def remove(self, qid: int, bounce_file: bool = True) -> None:
        """The message is done (every recipient delivered or bounced).  The message goes
        first: a crash between the two leaves a stale bounce file, which carries the old
        message's token and is therefore ignored by any later message with the same id
        (and removed by `cleanup` once it has no message).  `bounce_file=False` (the
        envelope's flag) skips the second unlink for a message known to have none."""
        self.remove_many([(qid, bounce_file)])     # (bounce_file also covers defer/<N>)

    def remove_many(self, items: list[tuple]) -> None:
        """`remove` for many (qid, bounce_file[, size]) items in one FileOps.unlink_many
        call; messages before bounce files, as in `remove`. Raises the first error other
        than a file already gone (after trying every removal). With recycling, messages
        whose size (the message's, without envelope) is given and at most RECYCLE_MAX go
        to free/ instead, while it has room (one FileOps.rename_many call, first)."""
        keep: list[int] = []
        if self.recycle:
            room = FREE_MAX - len(self._free)
            for item in items:
                if room <= 0:
                    break
                if len(item) > 2 and item[2] is not None and item[2] <= RECYCLE_MAX:
                    keep.append(int(item[0]))
                    room -= 1
        kept: set[int] = set()
        freed: list[int] = []
        if keep:
            for qid, e in zip(keep, self.ops.rename_many(
                    [self.message_path(q) for q in keep],
                    [os.path.join(self.free_dir, str(q)) for q in keep])):
                if e is None:
                    freed.append(qid)
                    kept.add(qid)
                elif isinstance(e, FileNotFoundError):
                    kept.add(qid)           # already gone: nothing to unlink either
                # else: unlinked below like any other message
        paths = [self.message_path(item[0]) for item in items if int(item[0]) not in kept]
        paths += [os.path.join(self.bounce_dir, str(int(item[0]))) for item in items
                  if item[1]]
        paths += [os.path.join(self.defer_dir, str(int(item[0]))) for item in items
                  if item[1]]
        errors = self.ops.unlink_many(paths)
        # Reusable only now: a new message with the same id must not lose its bounce/ or
        # defer/ file to this removal's unlinks of the old message's.
        self._free.extend(freed)
        for e in errors:
            if e is not None and not isinstance(e, FileNotFoundError):
                raise e

    def move_corrupt(self, qid: int) -> str:
        """Move a damaged entry aside (never delete what might be a customer's mail)."""
        dst = os.path.join(self.corrupt_dir, "%d.%d" % (int(qid), int(self.clock())))
        os.rename(self.message_path(qid), dst)
        bounce = os.path.join(self.bounce_dir, str(int(qid)))
        if os.path.exists(bounce):
            os.rename(bounce, dst + ".bounce")
        return dst

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove tmp/ files older than 36 hours and bounce files without a message."""
        now = self.clock() if now is None else now
        removed = []
        for path in self.tmp_files():
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mtime + TMP_MAX_AGE < now:
                self._unlink_quietly(path)
                removed.append(path)
        side = [(self.bounce_dir, n) for n in os.listdir(self.bounce_dir)]
        side += [(self.defer_dir, n) for n in os.listdir(self.defer_dir)]
        for directory, name in side:
            if name.isdigit() and not os.path.exists(os.path.join(self.mess_dir, name)):
                path = os.path.join(directory, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                # A bounce file is created only for an existing message; give a message
                # that is being committed right now no chance to race with us.
                if st.st_mtime + TMP_MAX_AGE < now:
                    self._unlink_quietly(path)
                    removed.append(path)
        return removed

    def tmp_files(self) -> list[str]:
        out = []
        for d in self.tmp_dirs:
            try:
                out.extend(os.path.join(d, name) for name in os.listdir(d))
            except FileNotFoundError:
                continue
        return sorted(out)

    # -- deferrals (what `queue list` shows) -----------------------------------------------------
    def record_deferrals(self, env: Envelope, items: list[tuple[int, str]],
                         when: float | None = None) -> None:
        """Count one more deferred attempt for each (index, text) and keep its text and time.

        Information only, so no fsync: the file is rewritten (tmp + rename) and a crash may
        lose the last counts. Marks `env.bounce_file` so that removal also unlinks it."""
        if not items:
            return
        when = self.clock() if when is None else when
        known = self.deferrals(env)
        for index, text in items:
            attempts = known.get(index, (0, None, None))[0] + 1
            known[index] = (attempts, when, text[:DEFER_TEXT_MAX])
        raw = b"".join(
            encode_bounce_record(env.token, i, env.recipients[i].address,
                                 "%d %d %s" % (n, int(t or 0), text))
            for i, (n, t, text) in sorted(known.items()))
        env.bounce_file = True
        path = os.path.join(self.defer_dir, str(env.qid))
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        try:
            write_all(self.ops, fd, raw)
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def deferrals(self, env: Envelope) -> dict[int, tuple[int, float | None, str]]:
        """index -> (attempts, time of the last, its text) for this message (its token)."""
        try:
            with open(os.path.join(self.defer_dir, str(env.qid)), "rb") as f:
                raw = f.read(DEFER_FILE_MAX)
        except FileNotFoundError:
            return {}
        out = {}
        for index, (_addr, value) in decode_bounce_records(raw, env.token).items():
            n, _, rest = value.partition(" ")
            t, _, text = rest.partition(" ")
            try:
                out[index] = (int(n), float(t) or None, text)
            except ValueError:
                continue
        return out

    def page_ids(self, after: int | None, limit: int) -> tuple[list[int], int, int]:
        """The `limit` smallest ids above `after`, how many messages there are in all, and how
        many come after the page: one pass over mess/, memory for `limit` ids only (a queue
        of a million messages is listed page by page)."""
        import heapq
        total = 0

        def ids():
            nonlocal total
            with os.scandir(self.mess_dir) as it:
                for e in it:
                    if e.name.isdigit():
                        total += 1
                        n = int(e.name)
                        if after is None or n > after:
                            yield n
        count_after = 0

        def counted():
            nonlocal count_after
            for n in ids():
                count_after += 1
                yield n
        page = heapq.nsmallest(limit, counted())
        return page, total, count_after - len(page)

    def entry(self, qid: int, deferrals: bool = True) -> QueueEntry:
        """One message for `queue list`/`queue show`; OSError/CorruptEntry when it is gone
        or damaged."""
        env = self.read_envelope(qid)
        nxt = self.next_try(qid)
        defer = self.deferrals(env) if deferrals else {}
        failed = self.failures(env) if any(r.state == FAILED for r in env.recipients) else {}
        words = {TODO: "todo", DELIVERED: "done", FAILED: "failed"}
        details = []
        for r in env.recipients:
            n, t, text = defer.get(r.index, (0, None, None))
            details.append(RecipientInfo(r.index, r.address, words[r.state], n, t, text,
                                         failed.get(r.index, (None, None))[1]))
        return QueueEntry(qid, env.birth, env.size, env.sender,
                          [(d.address, d.state) for d in details], nxt,
                          naming.message_name(qid, env.token), details, env.received_from)

    def entries_page(self, after: int | None, limit: int) -> tuple[list[QueueEntry], int, int]:
        """(entries of one page, messages in all, messages after the page): `queue list`."""
        ids, total, rest = self.page_ids(after, limit)
        out = []
        for qid in ids:
            try:
                out.append(self.entry(qid))
            except (OSError, CorruptEntry):
                continue
        return out, total, rest

    def header(self, env: Envelope, limit: int = SHOW_HEADER_MAX) -> bytes:
        """The message's header section (without the blank line), at most `limit` bytes."""
        with self.open_message(env) as r:
            data = r.read(limit)
        end = data.find(b"\n\n")
        return data if end < 0 else data[:end + 1]

    def entries(self) -> list[QueueEntry]:
        """Every message, for `mailappliance queue list` (qmail-qread)."""
        out = []
        for qid in self.list_ids():
            try:
                env = self.read_envelope(qid)
                nxt = self.next_try(qid)
            except (OSError, CorruptEntry):
                continue
            out.append(QueueEntry(qid, env.birth, env.size, env.sender,
                                  [(r.address, {TODO: "todo", DELIVERED: "done",
                                                FAILED: "failed"}[r.state])
                                   for r in env.recipients], nxt))
        return out

    def _unlink_quietly(self, path: str) -> None:
        try:
            self.ops.unlink(path)
        except FileNotFoundError:
            pass
