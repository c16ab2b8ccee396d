"""Maildir delivery: the only writer of mailboxes (a store: blocking file I/O, no Twisted).

The Maildir protocol (D. J. Bernstein, https://cr.yp.to/proto/maildir.html, as qmail-local
and vdelivermail do it):

1. create ``tmp/<time>.M<usec>P<pid>Q<seq>.<host>`` with O_EXCL (unique: time, process, a
   per-process sequence number and the host name, '/' and ':' escaped as \\057 and \\072);
2. write ``Return-Path: <sender>`` and ``Delivered-To: <recipient>`` and then the message;
3. fsync and close the file;
4. rename it into ``new/`` (qmail-local links and then unlinks the tmp/ name, so as never to
   replace anything; Dovecot renames, since the unique name already guarantees that -- and so
   do we: one system call instead of two);
5. fsync ``new/`` so the new name is on disk before we report success.

So a partial file is never visible in new/.  The name in new/ carries ``,S=<bytes>`` and
``,W=<bytes with CRLF line ends>`` (Maildir++ / Dovecot) so quota checks and POP3 listings
need no stat or read.

Every failure here is temporary (qmail-local exits 111 on maildir errors): ENOSPC, EDQUOT,
EROFS, EIO, a missing directory.  A full mailbox (the vpopmail quota) is temporary too: the
message waits in the queue and is retried until the queue lifetime ends, then bounces with
the last reason -- that gives the user days to clean up, where an immediate bounce (what a
hard vpopmail quota did) loses the mail for a moment's overflow.
"""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path
from typing import Iterable

from mailappliance.fileops import FileOps, process_id, write_all

_seq = itertools.count(1)
# A message chunk up to this size is written together with the two header lines (one write).
JOIN_WRITE_MAX = 64 * 1024

# Texts of the temporary failures (qmail-local / vdelivermail wording, #4.x.x codes).
TEXT_FULL = "Recipient's mailbox is full. (#4.2.2)"
TEXT_NOSPACE = "Unable to write to maildir: the disk is full. (#4.3.0)"
TEXT_READONLY = "Unable to write to maildir: read-only file system. (#4.3.0)"
TEXT_WRITE = "Unable to write to maildir: {why}. (#4.3.0)"
TEXT_SUCCESS = "did 1+0+0/"


class MaildirError(Exception):
    """A delivery that did not happen; `temporary` is always True for Maildir problems."""

    def __init__(self, text: str, temporary: bool = True) -> None:
        super().__init__(text)
        self.text = text
        self.temporary = temporary


def _safe_host(hostname: str) -> str:
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


def unique_name(now: float, hostname: str) -> str:
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return "%d.M%dP%dQ%d.%s" % (sec, usec, process_id(), next(_seq), _safe_host(hostname))


def _size_of(name: str, path: str) -> int:
    for part in name.split(":", 1)[0].split(",")[1:]:
        if part.startswith("S=") and part[2:].isdigit():
            return int(part[2:])
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def usage(maildir: str) -> int:
    """Bytes in new/ and cur/ (the quota counts what the user keeps)."""
    total = 0
    for sub in ("new", "cur"):
        d = os.path.join(maildir, sub)
        try:
            with os.scandir(d) as it:
                for entry in it:
                    if not entry.name.startswith("."):
                        total += _size_of(entry.name, entry.path)
        except FileNotFoundError:
            continue
    return total


def _error_text(e: OSError) -> str:
    if e.errno == errno.EDQUOT:
        return TEXT_FULL
    if e.errno == errno.ENOSPC:
        return TEXT_NOSPACE
    if e.errno == errno.EROFS:
        return TEXT_READONLY
    return TEXT_WRITE.format(why=(e.strerror or str(e)).lower())


class Pending:
    """A message on its way into a Maildir: `prepare` names it, `begin` (or `create_many`)
    makes its tmp/ file (steps 1-2), `finish_many` completes steps 3-5 for any number of
    them; `deliver` does all for one. `data` holds bytes not yet written (the header lines
    and a message given whole), which `finish_many` writes in the same call as the fsyncs."""

    __slots__ = ("maildir", "tmp", "name", "fd", "size", "lines", "final", "error", "data")

    def __init__(self, maildir: str, tmp: str, name: str, fd: int | None) -> None:
        self.maildir = maildir
        self.tmp = tmp
        self.name = name
        self.fd: int | None = fd
        self.size = 0
        self.lines = 0
        self.final: str | None = None
        self.error: MaildirError | None = None
        self.data: bytes | None = None


def prepare(maildir: Path | str, *, return_path: str, delivered_to: str, hostname: str,
            now: float, quota: int = 0, size_hint: int | None = None,
            pending_bytes: int = 0, data: bytes | None = None) -> Pending:
    """Step 0, no system call but the quota's: check the quota, pick the unique name, and
    with `data` (the whole message) keep the bytes to write: the two header lines and it.

    `pending_bytes`: bytes already on their way into this Maildir in the same batch (quota).
    Raises MaildirError (temporary)."""
    maildir = str(maildir)
    header = ("Return-Path: <%s>\nDelivered-To: %s\n" % (return_path, delivered_to)).encode(
        "utf-8", "surrogateescape")
    if quota > 0:
        expected = len(header) + (size_hint or 0)
        if usage(maildir) + pending_bytes + expected > quota:
            raise MaildirError(TEXT_FULL)
    name = unique_name(now, hostname)
    p = Pending(maildir, os.path.join(maildir, "tmp", name), name, None)
    if data is not None:
        p.data = header + data
        p.size, p.lines = len(p.data), p.data.count(b"\n")
    else:
        p.data = header
        p.size, p.lines = len(header), 2
    return p


def create_many(pendings: list[Pending], ops: FileOps | None = None) -> list[Pending]:
    """Step 1 for several prepared messages in one FileOps.create_many call; a Maildir that
    is missing (a new user's first message, or one someone removed) is created and the file
    tried again. A message that cannot be created gets `error`."""
    ops = ops or FileOps()
    todo = [p for p in pendings if p.error is None and p.fd is None]
    for p, r in zip(todo, ops.create_many([p.tmp for p in todo])):
        if isinstance(r, FileNotFoundError):
            # Checking for the directories before every delivery would cost six system calls.
            try:
                make_dirs(p.maildir)
                p.fd = ops.open_excl(p.tmp)
            except OSError as e:
                p.error = MaildirError(_error_text(e))
        elif isinstance(r, OSError):
            p.error = MaildirError(_error_text(r))
        else:
            p.fd = r[0]
    return pendings


def begin(maildir: Path | str, chunks: Iterable[bytes], *, return_path: str,
          delivered_to: str, hostname: str, now: float, quota: int = 0,
          size_hint: int | None = None, ops: FileOps | None = None,
          pending_bytes: int = 0) -> Pending:
    """Steps 1-2: a unique tmp/ file with the two header lines and the message, unsynced.

    `pending_bytes`: bytes already on their way into this Maildir in the same batch (quota).
    Raises MaildirError (temporary); nothing is left behind then."""
    ops = ops or FileOps()
    p = prepare(maildir, return_path=return_path, delivered_to=delivered_to,
                hostname=hostname, now=now, quota=quota, size_hint=size_hint,
                pending_bytes=pending_bytes)
    header, p.data = p.data, None
    create_many([p], ops)
    if p.error is not None:
        raise p.error
    fd = p.fd
    try:
        chunks = iter(chunks)
        first = next(chunks, b"")
        if len(first) <= JOIN_WRITE_MAX:
            head, p.size = header + first, len(header) + len(first)
            write_all(ops, fd, head)
            p.lines = head.count(b"\n")
        else:
            chunks = itertools.chain((first,), chunks)
            write_all(ops, fd, header)
            p.size, p.lines = len(header), 2
        for chunk in chunks:
            write_all(ops, fd, chunk)
            p.size += len(chunk)
            p.lines += chunk.count(b"\n")
    except OSError as e:
        discard(p, ops)
        raise MaildirError(_error_text(e)) from e
    return p


def make_dirs(maildir: str) -> None:
    """tmp/, new/ and cur/ of a Maildir, as far as they are missing (mode 0700)."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)


def discard(p: Pending, ops: FileOps) -> None:
    """Forget a message that will not be delivered: close and remove its tmp/ file."""
    if p.fd is not None:
        try:
            ops.close(p.fd)
        except OSError:
            pass
        p.fd = None
    try:
        ops.unlink(p.tmp)
    except OSError:
        pass


def finish_many(pendings: list[Pending], ops: FileOps | None = None) -> list[Pending]:
    """Steps 2-5 for several messages: write what is left to write, fsync each file, rename
    each into new/, then fsync each new/ directory once for all the names renamed into it (a
    group commit: N messages to one Maildir cost N file fsyncs and one directory fsync, and
    the file fsyncs after the first find their data already written by the journal commit
    it caused). All of it is one FileOps.commit_many call.

    Each Pending ends with `final` (its name in new/, durable) or `error` (a MaildirError;
    nothing of it is left in new/), independently of the others."""
    ops = ops or FileOps()
    todo = [p for p in pendings if p.error is None and p.fd is not None]
    finals = ["%s,S=%d,W=%d" % (p.name, p.size, p.size + p.lines) for p in todo]
    items = [(p.fd, p.data, p.tmp, os.path.join(p.maildir, "new", final))
             for p, final in zip(todo, finals)]
    new_dirs = list(dict.fromkeys(os.path.join(p.maildir, "new") for p in todo))
    try:
        errs, derrs = ops.commit_many(items, new_dirs)
    except Exception as e:  # noqa: BLE001 - state unknown: none delivered, nothing claimed
        # Before or after its system calls: the descriptors may be closed and their numbers
        # reused, so they are left alone (at worst a leak). A file that did reach new/ is a
        # duplicate when the queue retries, never a loss.
        for p in todo:
            p.data, p.fd = None, None
            p.error = MaildirError(TEXT_WRITE.format(why=str(e).lower() or type(e).__name__))
            discard(p, ops)
        return pendings
    dir_error = dict(zip(new_dirs, derrs))
    rescued: set[int] = set()
    for p, final, err in zip(todo, finals, errs):
        p.data = None
        if err is None:
            p.fd, p.final = None, final
            continue
        step, e = err
        if step not in ("write", "fsync"):
            p.fd = None                                     # closed already
        if step == "rename" and isinstance(e, FileNotFoundError):
            new_dir = os.path.join(p.maildir, "new")         # new/ went missing meanwhile
            try:
                make_dirs(p.maildir)
                ops.rename(p.tmp, os.path.join(new_dir, final))
                ops.fsync_dir(new_dir)
                p.final = final
                rescued.add(id(p))
                continue
            except OSError as e2:
                e = e2
        p.error = MaildirError(_error_text(e))
        discard(p, ops)
    for p in todo:                                         # new/ not known durable
        e = dir_error.get(os.path.join(p.maildir, "new"))
        if e is not None and p.final is not None and id(p) not in rescued:
            # take it back so a retry cannot leave two copies
            try:
                ops.unlink(os.path.join(p.maildir, "new", p.final))
            except OSError:
                pass
            p.final = None
            p.error = MaildirError(_error_text(e))
    return pendings


def deliver(maildir: Path | str, chunks: Iterable[bytes], *, return_path: str,
            delivered_to: str, hostname: str, now: float, quota: int = 0,
            size_hint: int | None = None, ops: FileOps | None = None) -> str:
    """Deliver one message; return its name in new/.  Raises MaildirError (temporary)."""
    p = begin(maildir, chunks, return_path=return_path, delivered_to=delivered_to,
              hostname=hostname, now=now, quota=quota, size_hint=size_hint, ops=ops)
    (p,) = finish_many([p], ops)
    if p.error is not None:
        raise p.error
    return p.final
