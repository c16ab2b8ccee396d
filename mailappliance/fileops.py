"""The file system calls of the durable writers (the queue and the Maildirs), injectable.

The ground floor, as chasquid's safeio: the queue store (queue/store.py) and the Maildir writer
(delivery/maildir.py) both make their system calls through a `FileOps`, so tests can make the
disk fail at a chosen step (ENOSPC on write, EIO on fsync, ...) instead of monkeypatching `os`.
Imports nothing of ours; no Twisted.

The batch calls (`create_many`, `commit_many`, `unlink_many`) make the same calls for many
files at once: with the optional C helper (mailappliance/_fileops.c, built by setup.py into the
module ``mailappliance_fileops``) each batch is one call that releases the GIL once; without it
the same calls are made from Python, in the same order and with the same per-file results.
"""

from __future__ import annotations

import errno
import os
import weakref
from typing import Callable

try:   # optional C helper (setup.py): a batch of file system calls with the GIL released once
    import mailappliance_fileops as _native
except ImportError:     # pragma: no cover - built wherever a C compiler is
    _native = None
if _native is not None and not hasattr(_native, "rename_many"):    # pragma: no cover
    _native = None      # a build of an older _fileops.c: its calls take other arguments


class FileOps:
    """The system calls the durable writers make.  Tests subclass this to fail at a chosen step
    (ENOSPC on write, EIO on fsync, ...) instead of monkeypatching `os`."""

    def open_excl(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                       0o600)

    def open_existing(self, path: str) -> int:
        """Open a file that is there for writing, from its start (the queue's recycled
        files): nothing created, nothing truncated."""
        return os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))

    def write(self, fd: int, data) -> int:
        return os.write(fd, data)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

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
    # switch interval) is longer than the call. _fileops.c (the C helper) makes the same calls,
    # in the same order and with the same per-file results, with the GIL released once per
    # batch. A subclass (a test making one call fail) always gets the per-call Python path, so
    # its overrides are honoured.

    def _native_for(self, *names: str) -> bool:
        if _native is None or not NATIVE_BATCHES:
            return False
        cls = type(self)
        return cls is FileOps or all(getattr(cls, n) is getattr(FileOps, n) for n in names)

    def create_many(self, paths: list[str], create: bool = True) -> list:
        """open_excl each path (with `create` false: open_existing) -> per path (fd, inode
        number) or the OSError it met."""
        opener = "open_excl" if create else "open_existing"
        if self._native_for(opener):
            return [(fd, ino) if fd >= 0 else _os_error(-fd, path)
                    for path, (fd, ino) in zip(paths,
                                               _native.create_files(paths, 0o600, create))]
        out: list = []
        for path in paths:
            try:
                fd = getattr(self, opener)(path)
            except OSError as e:
                out.append(e)
                continue
            try:
                out.append((fd, os.fstat(fd).st_ino))
            except OSError as e:
                self.close(fd)
                if create:
                    self.unlink(path)
                out.append(e)
        return out

    def commit_many(self, items: list[tuple], dirs: list[str]) -> tuple[list, list]:
        """The group commit of several files: `items` are (fd, data or None, src or None,
        dst or None[, size]). Writes every item's data, then truncates it to `size` when
        one is given (a recycled file may have been longer; a failure counts as "write");
        with more than one item, `start_writeback` for each; then per item fsync, close,
        rename(src, dst); then `fsync_dir` each of `dirs`. -> (per item None or (step,
        OSError) with step "write", "fsync", "close" or "rename"; per dir None or OSError).
        An item stops at its first failure; its fd is still open after a failed write or
        fsync and closed after the others."""
        if self._native_for("write", "truncate", "start_writeback", "fsync", "close",
                            "rename", "fsync_dir"):
            held = getattr(self, "_held", None) or {}
            res, dres = _native.commit(items, [held.get(d, d) for d in dirs], True)
            errs = [None if r is None else (_STEPS[r[0]], _os_error(r[1], items[k][2]))
                    for k, r in enumerate(res)]
            return errs, [_os_error(e, d) if e else None for e, d in zip(dres, dirs)]
        errs: list = [None] * len(items)
        for k, item in enumerate(items):
            fd, data = item[0], item[1]
            size = item[4] if len(item) > 4 else -1
            try:
                if data:
                    write_all(self, fd, data)
                if size >= 0:
                    self.truncate(fd, size)
            except OSError as e:
                errs[k] = ("write", e)
        if len(items) > 1:
            for k, item in enumerate(items):
                if errs[k] is None:
                    self.start_writeback(item[0])
        for k, (fd, _data, src, dst, *_size) in enumerate(items):
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

    def rename_many(self, srcs: list[str], dsts: list[str]) -> list:
        """rename each of `srcs` to its `dsts` -> per pair None or the OSError it met."""
        if self._native_for("rename"):
            return [_os_error(e, p) if e else None
                    for e, p in zip(_native.rename_many(srcs, dsts), srcs)]
        return _each(lambda pair: self.rename(*pair), list(zip(srcs, dsts)))

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


# Read once per process: a system call in a pool thread is a GIL hand-over (costly on this
# kind of VM). A forked child starts afresh.
_ids: dict[str, int] = {}


def process_id() -> int:
    """os.getpid(), read once per process (for queue tmp/ and Maildir names)."""
    pid = _ids.get("pid")
    if pid is None:
        pid = _ids["pid"] = os.getpid()
    return pid


os.register_at_fork(after_in_child=_ids.clear)
