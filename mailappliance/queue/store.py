"""The queue directory: qmail-queue's files, written by this module and nobody else.

A store: blocking file I/O, no Twisted. Adapters call it from a thread pool; the `sendmail`
command calls it directly.

Layout under ``<data>/queue``::

    tmp/<k>/<time>.<pid>.<seq>.<rand>  an injection in progress (never looked at by delivery);
                                    k is per writer thread: concurrent creates and fsyncs in
                                    one directory contend (measured here: 8 writers reach
                                    ~2,000 commits/s in one tmp/ and ~3,300 in separate ones)
    mess/<N>                        a committed message; N is its inode number, like qmail's
                                    queue ids, so ids are unique across processes for free
    bounce/<N>                      failure reports of message N, appended before the
                                    recipient is marked failed (qmail's bounce/ directory)
    corrupt/<N>                     entries that could not be parsed, moved aside with a log line
    trigger                         unix datagram socket of the running manager (qmail's
                                    lock/trigger): injectors poke it, delivery starts at once

One message is one file: ``message bytes | envelope | trailer``.  The message part is the
canonical stored form (lines end in LF, no dot-stuffing).  The envelope is a list of records
``<tag><len>:<bytes>\\n``; recipient records carry one status byte before the length,
``R<status><len>:<address>\\n``.  Every value is length-prefixed, so CR, LF or NUL inside an
address cannot start a new record.  No pickle anywhere.  The fixed-size trailer names the
two lengths and a CRC-32 of the envelope (status bytes counted as ``T``), so a truncated or
damaged file is recognised instead of being misread.

Per-recipient state lives in those status bytes, as qmail-send keeps ``T``/``D`` marks in its
local/ and remote/ files: ``T`` to do, ``D`` delivered, ``F`` failed (its bounce record is
already on disk).  A mark is one byte written in place and fdatasync'ed, so a crash after
three of five deliveries redelivers only the other two.

The commit point is one rename: ``tmp/x`` -> ``mess/N`` after the file (data, envelope,
trailer) has been fsynced; the rename is durable once ``mess/`` itself is fsynced.  The
adapter (inject.py) groups that directory fsync over every rename that finished before it
started, so concurrent injections share one; `inject()` here does all steps for one message.

The time a message should next be tried is kept as the mtime of its file (qmail-send keeps
it as the mtime of the info file); losing it in a crash only means an earlier retry.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import socket
import stat
import threading
import time
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

try:   # optional C helper (setup.py): a batch of file system calls with the GIL released once
    import mailappliance_fileops as _native
except ImportError:     # pragma: no cover - built wherever a C compiler is
    _native = None

# --- names and limits ------------------------------------------------------------------------

TMP, MESS, BOUNCE, CORRUPT = "tmp", "mess", "bounce", "corrupt"
TRIGGER = "trigger"

# Recipient states (one byte each, rewritten in place).
TODO, DELIVERED, FAILED = b"T", b"D", b"F"
_STATES = frozenset((TODO, DELIVERED, FAILED))

FORMAT_VERSION = b"1"
_MAGIC = b"MAQ1"
# "\nMAQ1 <20 digits> <20 digits> <8 hex>\n": fixed size so a reader finds it from the end.
TRAILER_SIZE = 1 + 4 + 1 + 20 + 1 + 20 + 1 + 8 + 1

# RFC 5321 4.5.3.1.3: a path is at most 256 octets; allow some slack for SMTPUTF8 and
# alias expansion, refuse anything that could only be an attack on the envelope format.
MAX_ADDRESS = 1024
# One envelope field (e.g. received_from) at most this long.
MAX_FIELD = 4096
# An envelope larger than this is not one we wrote (100 recipients of 256 octets need 26 KiB;
# the sendmail command and alias expansion may carry more recipients, but not 16 MiB of them).
MAX_ENVELOPE = 16 * 1024 * 1024
# A length prefix longer than this many digits cannot fit MAX_ENVELOPE.
_MAX_LEN_DIGITS = 8
# qmail-clean removes leftovers of injections that never completed after 36 hours
# (qmail-send.c: "if (st.st_mtime + 129600 < recent)").
TMP_MAX_AGE = 36 * 60 * 60
# tmp/ subdirectories, one per concurrent writer thread (more than the thread pool's size).
TMP_SPLIT = 16
# Messages up to this size stay in memory for their first delivery, up to this many bytes in all
# (QueueStore.keep_data).
KEEP_DATA_MAX = 64 * 1024
KEEP_DATA_TOTAL = 16 * 1024 * 1024
# Bytes read at a time when handing a message to a deliverer.
READ_CHUNK = 64 * 1024


class QueueWriteError(Exception):
    """The message could not be committed; nothing of it is visible in the queue.

    SMTP answers ``451 qq write error or disk full (#4.3.0)``; sendmail exits 75.
    """


class CorruptEntry(Exception):
    """A queue file that does not parse; the manager moves it to corrupt/."""


# --- the file system, injectable so tests can make the disk fail -----------------------------

class FileOps:
    """The system calls the store makes.  Tests subclass this to fail at a chosen step
    (ENOSPC on write, EIO on fsync, ...) instead of monkeypatching `os`."""

    def open_excl(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                       0o600)

    def write(self, fd: int, data) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def start_writeback(self, fd: int) -> None:
        """A hint before the fsyncs of a batch: start writing this file's data now.

        With delayed allocation a file's blocks are allocated only at writeback, so N files
        fsynced one after another each start their own writeback and journal commit. Linux's
        POSIX_FADV_DONTNEED starts asynchronous writeback of the dirty pages (and drops only
        pages already clean: a file just written keeps its cache), so the files of a batch
        are written together and the fsyncs after the first find less to do (a batch of 10
        2 KiB files on this machine: 12-20 % less time per file; sync_file_range, which
        Python's os module lacks, measured the same). The fsync that follows is still what
        makes each file durable; errors here are ignored because it will report them."""
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        held = getattr(self, "_held", None)
        fd = held.get(path) if held else None
        if fd is not None:
            os.fsync(fd)
            return
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def hold_dir(self, path: str) -> None:
        """Keep `path` open for `fsync_dir` (a directory that lives as long as this object:
        the queue's mess/), saving an open and a close per group commit. Closed when this
        object is collected."""
        held = getattr(self, "_held", None)
        if held is None:
            held = self._held = {}
            weakref.finalize(self, _close_all, held)
        if path not in held:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                         | getattr(os, "O_CLOEXEC", 0))
            if held.setdefault(path, fd) != fd:      # another thread was first: keep one
                os.close(fd)

    # -- batches: the same calls for many files, in one GIL-free call when possible ------------
    #
    # A pool thread gives up the GIL for each system call and has to win it back from the
    # reactor thread after it; with a busy reactor that wait (up to the interpreter's 5 ms
    # switch interval) is longer than the call. mailappliance_fileops.c makes the same calls,
    # in the same order and with the same per-file results, with the GIL released once per
    # batch. A subclass (a test making one call fail) always gets the per-call Python path, so
    # its overrides are honoured.

    def _native_for(self, *names: str) -> bool:
        if _native is None or not NATIVE_BATCHES:
            return False
        cls = type(self)
        return cls is FileOps or all(getattr(cls, n) is getattr(FileOps, n) for n in names)

    def create_many(self, paths: list[str]) -> list:
        """open_excl each path -> per path (fd, inode number) or the OSError it met."""
        if self._native_for("open_excl"):
            return [(fd, ino) if fd >= 0 else _os_error(-fd, path)
                    for path, (fd, ino) in zip(paths, _native.create_files(paths, 0o600))]
        out: list = []
        for path in paths:
            try:
                fd = self.open_excl(path)
            except OSError as e:
                out.append(e)
                continue
            try:
                out.append((fd, os.fstat(fd).st_ino))
            except OSError as e:
                self.close(fd)
                self.unlink(path)
                out.append(e)
        return out

    def commit_many(self, items: list[tuple], dirs: list[str]) -> tuple[list, list]:
        """The group commit of several files: `items` are (fd, data or None, src or None,
        dst or None). Writes every item's data; with more than one item, `start_writeback`
        for each; then per item fsync, close, rename(src, dst); then `fsync_dir` each of
        `dirs`. -> (per item None or (step, OSError) with step "write", "fsync", "close" or
        "rename"; per dir None or OSError). An item stops at its first failure; its fd is
        still open after a failed write or fsync and closed after the others."""
        if self._native_for("write", "start_writeback", "fsync", "close", "rename",
                            "fsync_dir"):
            held = getattr(self, "_held", None) or {}
            res, dres = _native.commit(items, [held.get(d, d) for d in dirs], True)
            errs = [None if r is None else (_STEPS[r[0]], _os_error(r[1], items[k][2]))
                    for k, r in enumerate(res)]
            return errs, [_os_error(e, d) if e else None for e, d in zip(dres, dirs)]
        errs: list = [None] * len(items)
        for k, (fd, data, _src, _dst) in enumerate(items):
            if data:
                try:
                    write_all(self, fd, data)
                except OSError as e:
                    errs[k] = ("write", e)
        if len(items) > 1:
            for k, item in enumerate(items):
                if errs[k] is None:
                    self.start_writeback(item[0])
        for k, (fd, _data, src, dst) in enumerate(items):
            if errs[k] is not None:
                continue
            step = "fsync"
            try:
                self.fsync(fd)
                step = "close"
                self.close(fd)
                if src is not None:
                    step = "rename"
                    self.rename(src, dst)
            except OSError as e:
                errs[k] = (step, e)
        return errs, _each(self.fsync_dir, dirs)

    def unlink_many(self, paths: list[str]) -> list:
        """unlink each path -> per path None or the OSError it met."""
        if self._native_for("unlink"):
            return [_os_error(e, p) if e else None
                    for e, p in zip(_native.unlink_many(paths), paths)]
        return _each(self.unlink, paths)


# Set False to make every FileOps take the per-call Python path (tests compare both paths).
NATIVE_BATCHES = True
_STEPS = {1: "write", 2: "fsync", 3: "close", 4: "rename"}


def _each(call: Callable[[str], object], paths: list[str]) -> list:
    """call(path) for each path -> per path None or the OSError it raised."""
    out: list = []
    for path in paths:
        try:
            call(path)
            out.append(None)
        except OSError as e:
            out.append(e)
    return out


def _os_error(code: int, path) -> OSError:
    """OSError(code) as os.* would raise it: the right subclass (FileNotFoundError, ...)."""
    return OSError(code, os.strerror(code), path)


def _close_all(fds: dict) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def write_all(ops: FileOps, fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = ops.write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises instead
            raise OSError(errno.EIO, "short write")
        view = view[n:]


# --- the envelope codec (pure) ---------------------------------------------------------------

@dataclass
class Recipient:
    index: int
    address: str
    state: bytes = TODO
    offset: int = 0          # file offset of the status byte (set when parsed)


@dataclass
class Envelope:
    sender: str
    recipients: list[Recipient]
    birth: float
    received_from: str | None = None
    qp: int = 0
    uid: int = 0
    token: str = ""
    qid: int = 0
    size: int = 0            # message bytes before the envelope
    # In memory only, never written: the message bytes while the first deliveries run (see
    # QueueStore.keep_data), and whether a bounce/ file may exist (False only for a message
    # this process injected and recorded no failure for: its removal skips that unlink).
    data: bytes | None = field(default=None, compare=False, repr=False)
    bounce_file: bool = field(default=True, compare=False, repr=False)

    @property
    def todo(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == TODO]

    @property
    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == FAILED]

    @property
    def finished(self) -> bool:
        return all(r.state != TODO for r in self.recipients)


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _record(tag: bytes, value: bytes, status: bytes = b"") -> bytes:
    return tag + status + str(len(value)).encode() + b":" + value + b"\n"


def encode_envelope(env: Envelope) -> bytes:
    out = [_record(b"V", FORMAT_VERSION),
           _record(b"B", repr(float(env.birth)).encode()),
           _record(b"P", str(int(env.qp)).encode()),
           _record(b"U", str(int(env.uid)).encode()),
           _record(b"K", _enc(env.token)),
           _record(b"S", _enc(env.sender))]
    if env.received_from is not None:
        out.append(_record(b"H", _enc(env.received_from)))
    for r in env.recipients:
        out.append(_record(b"R", _enc(r.address), r.state))
    return b"".join(out)


def _crc(envelope: bytes | bytearray, status_positions: Iterable[int]) -> int:
    masked = bytearray(envelope)
    for pos in status_positions:
        masked[pos] = TODO[0]
    return zlib.crc32(masked) & 0xFFFFFFFF


def _status_positions(envelope: bytes) -> list[int]:
    return [pos for _tag, _value, pos in _iter_records(envelope) if pos is not None]


def make_trailer(message_len: int, envelope: bytes) -> bytes:
    crc = _crc(envelope, _status_positions(envelope))
    trailer = b"\n%s %020d %020d %08x\n" % (_MAGIC, message_len, len(envelope), crc)
    assert len(trailer) == TRAILER_SIZE
    return trailer


def parse_trailer(trailer: bytes) -> tuple[int, int, int]:
    if (len(trailer) != TRAILER_SIZE or trailer[:1] != b"\n" or trailer[1:5] != _MAGIC
            or trailer[-1:] != b"\n"):
        raise CorruptEntry("no trailer (truncated file?)")
    parts = trailer[6:-1].split(b" ")
    if (len(parts) != 3 or len(parts[0]) != 20 or len(parts[1]) != 20 or len(parts[2]) != 8
            or not parts[0].isdigit() or not parts[1].isdigit()):
        raise CorruptEntry("malformed trailer")
    try:
        crc = int(parts[2], 16)
    except ValueError:
        raise CorruptEntry("malformed trailer") from None
    return int(parts[0]), int(parts[1]), crc


def _iter_records(envelope: bytes) -> Iterator[tuple[bytes, bytes, int | None]]:
    """Yield (tag, value, status_position_or_None); raise CorruptEntry on any deviation."""
    pos, end = 0, len(envelope)
    while pos < end:
        tag = envelope[pos:pos + 1]
        pos += 1
        status_pos = None
        if tag == b"R":
            status_pos = pos
            pos += 1
        colon = envelope.find(b":", pos, pos + _MAX_LEN_DIGITS + 1)
        digits = envelope[pos:colon] if colon >= 0 else b""
        if not digits or not digits.isdigit() or not digits.isascii():
            raise CorruptEntry("bad length in envelope record")
        length = int(digits)
        start = colon + 1
        stop = start + length
        if stop >= end or envelope[stop:stop + 1] != b"\n":
            raise CorruptEntry("envelope record overruns")
        yield tag, envelope[start:stop], status_pos
        pos = stop + 1


def decode_envelope(envelope: bytes, expected_crc: int | None = None,
                    base_offset: int = 0) -> Envelope:
    fields: dict[bytes, bytes] = {}
    recipients: list[Recipient] = []
    positions: list[int] = []
    for tag, value, status_pos in _iter_records(envelope):
        if tag == b"R":
            state = envelope[status_pos:status_pos + 1]
            if state not in _STATES:
                raise CorruptEntry("bad recipient state")
            positions.append(status_pos)
            recipients.append(Recipient(len(recipients), _dec(value), state,
                                        base_offset + status_pos))
        elif tag in (b"V", b"B", b"P", b"U", b"K", b"S", b"H"):
            if tag in fields:
                raise CorruptEntry("duplicate envelope field")
            fields[tag] = value
        else:
            raise CorruptEntry("unknown envelope record")
    if expected_crc is not None and _crc(envelope, positions) != expected_crc:
        raise CorruptEntry("envelope checksum mismatch")
    if fields.get(b"V") != FORMAT_VERSION:
        raise CorruptEntry("unknown queue format version")
    for need in (b"B", b"S", b"K"):
        if need not in fields:
            raise CorruptEntry("envelope field missing")
    if not recipients:
        raise CorruptEntry("envelope without recipients")
    try:
        birth = float(fields[b"B"])
        qp = int(fields.get(b"P", b"0"))
        uid = int(fields.get(b"U", b"0"))
    except ValueError:
        raise CorruptEntry("bad number in envelope") from None
    received = _dec(fields[b"H"]) if b"H" in fields else None
    return Envelope(sender=_dec(fields[b"S"]), recipients=recipients, birth=birth,
                    received_from=received, qp=qp, uid=uid, token=_dec(fields[b"K"]))


def check_envelope(sender: str, recipients: list[str]) -> None:
    check_address(sender, "sender")
    if not recipients:
        raise ValueError("no recipients")
    for r in recipients:
        check_address(r, "recipient")


def check_address(address: str, what: str) -> None:
    """Addresses are data: refuse the bytes that would let one forge an SMTP command later."""
    if not isinstance(address, str):
        raise ValueError(f"{what} must be a str")
    if len(_enc(address)) > MAX_ADDRESS:
        raise ValueError(f"{what} too long")
    if any(c in address for c in "\r\n\0"):
        raise ValueError(f"{what} contains CR, LF or NUL")


# --- bounce records (per message, append-only) ----------------------------------------------

def _encode_bounce_record(token: str, index: int, address: str, text: str) -> bytes:
    body = (_record(b"K", _enc(token)) + _record(b"I", str(index).encode())
            + _record(b"A", _enc(address)) + _record(b"T", _enc(text)))
    return _record(b"X", body)


def _decode_bounce_records(raw: bytes, token: str) -> dict[int, tuple[str, str]]:
    """index -> (address, text); a torn last record (crash mid-append) is ignored."""
    out: dict[int, tuple[str, str]] = {}
    try:
        for tag, value, _ in _iter_records(raw):
            if tag != b"X":
                break
            fields = {t: v for t, v, _p in _iter_records(value)}
            if _dec(fields.get(b"K", b"")) != token:
                continue  # left over from an earlier message with the same inode number
            out[int(fields[b"I"])] = (_dec(fields.get(b"A", b"")), _dec(fields.get(b"T", b"")))
    except (CorruptEntry, KeyError, ValueError):
        pass
    return out


# --- the store -------------------------------------------------------------------------------

_seq = itertools.count(1)
_shard_counter = itertools.count()
_thread_shard = threading.local()


# Read once per process: each of these is a system call, and in a pool thread every system
# call is a GIL hand-over (costly on this kind of VM). The uid is read at the first injection,
# after twistd has dropped privileges; a forked child starts afresh.
_ids: dict[str, object] = {}


def process_id() -> int:
    """os.getpid(), read once per process (also for Maildir names)."""
    pid = _ids.get("pid")
    if pid is None:
        pid = _ids["pid"] = os.getpid()
    return pid


def _uid() -> int:
    uid = _ids.get("uid")
    if uid is None:
        uid = _ids["uid"] = os.getuid()
    return uid


def _token_bits() -> int:
    """32 random bits for tmp/ names and message tokens: unique, not secret (O_EXCL and the
    pid make names unique; the token only tells a message from an earlier one with the same
    inode), so a generator seeded from the kernel once per process does."""
    rng = _ids.get("rng")
    if rng is None:
        rng = _ids["rng"] = random.Random(os.urandom(16))
    return rng.getrandbits(32)


os.register_at_fork(after_in_child=_ids.clear)


def _my_tmp_shard() -> int:
    shard = getattr(_thread_shard, "k", None)
    if shard is None:
        shard = _thread_shard.k = next(_shard_counter) % TMP_SPLIT
    return shard


class TmpMessage:
    """An injection in progress: a file in tmp/ that only its writer knows about."""

    def __init__(self, store: "QueueStore", path: str, fd: int, token: str,
                 ino: int | None = None) -> None:
        self.store = store
        self.path = path
        self.fd = fd
        self.token = token
        self.ino = ino                           # known when created by create_many
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
                           uid=_uid() if uid is None else uid,
                           token=self.token)
            envelope = encode_envelope(env)
            if len(envelope) > MAX_ENVELOPE:
                raise QueueWriteError("envelope too large")
            self.size += len(data)
            positions = _status_positions(envelope)
            trailer = b"\n%s %020d %020d %08x\n" % (_MAGIC, self.size, len(envelope),
                                                    _crc(envelope, positions))
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
        ops.fsync(self.fd)
        ops.close(self.fd)
        self.closed = True
        ops.rename(self.path, os.path.join(self.store.mess_dir, str(ino)))

    def _commit_item(self) -> tuple:
        """The FileOps.commit_many item of an unsynced finish."""
        if self.closed or not self._unsynced:
            raise QueueWriteError("complete without an unsynced finish")
        return (self.fd, self._tail, self.path,
                os.path.join(self.store.mess_dir, str(self.envelope.qid)))

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
        """Abort: close and remove the tmp file; nothing of it was ever visible."""
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
class QueueEntry:
    """What `list` shows to the admin."""
    qid: int
    birth: float
    size: int
    sender: str
    recipients: list[tuple[str, str]] = field(default_factory=list)  # (address, state)
    next_try: float = 0.0


class QueueStore:
    def __init__(self, queue_dir: Path | str, *, clock: Callable[[], float] = time.time,
                 ops: FileOps | None = None) -> None:
        self.dir = str(queue_dir)
        self.clock = clock
        self.ops = ops or FileOps()
        self.tmp_dir = os.path.join(self.dir, TMP)
        self.mess_dir = os.path.join(self.dir, MESS)
        self.bounce_dir = os.path.join(self.dir, BOUNCE)
        self.corrupt_dir = os.path.join(self.dir, CORRUPT)
        self.trigger_path = os.path.join(self.dir, TRIGGER)
        for d in (self.dir, self.tmp_dir, self.mess_dir, self.bounce_dir, self.corrupt_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.tmp_dirs = [os.path.join(self.tmp_dir, str(k)) for k in range(TMP_SPLIT)]
        for d in self.tmp_dirs:
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.kept_bytes = 0
        self._holding = False

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
        token = "%d.%d.%d.%08x" % (int(self.clock()), process_id(), next(_seq), _token_bits())
        return os.path.join(self.tmp_dirs[_my_tmp_shard()], token)

    def begin(self) -> TmpMessage:
        path = self._tmp_path()
        token = os.path.basename(path)
        try:
            fd = self.ops.open_excl(path)
        except OSError as e:
            raise QueueWriteError(f"queue write failed: {e.strerror or e}") from e
        return TmpMessage(self, path, fd, token)

    def begin_many(self, n: int) -> list:
        """`n` injections at once (one call into FileOps.create_many): per injection a
        TmpMessage that already knows its queue id, or the QueueWriteError it met."""
        paths = [self._tmp_path() for _ in range(n)]
        out: list = []
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
            self.pull_trigger()
        return qid

    def pull_trigger(self) -> None:
        """Tell a running manager to look (qmail-queue writes a byte to lock/trigger)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.sendto(b"!", self.trigger_path)
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
            if state not in _STATES:
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
            write_all(self.ops, fd, _encode_bounce_record(env.token, index, rcpt.address, text))
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
        return _decode_bounce_records(raw, env.token)

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
        self.remove_many([(qid, bounce_file)])

    def remove_many(self, items: list[tuple[int, bool]]) -> None:
        """`remove` for many (qid, bounce_file) pairs in one FileOps.unlink_many call;
        messages before bounce files, as in `remove`. Raises the first error other than
        a file already gone (after trying every removal)."""
        paths = [self.message_path(qid) for qid, _ in items]
        paths += [os.path.join(self.bounce_dir, str(int(qid))) for qid, bf in items if bf]
        for e in self.ops.unlink_many(paths):
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
        for name in os.listdir(self.bounce_dir):
            if name.isdigit() and not os.path.exists(os.path.join(self.mess_dir, name)):
                path = os.path.join(self.bounce_dir, name)
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
