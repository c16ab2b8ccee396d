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

from mailappliance.queue.store import FileOps, process_id, write_all

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
    """A message written to tmp/ but not yet synced or visible: `begin` makes it (steps 1-2),
    `finish_many` completes steps 3-5 for any number of them; `deliver` does both for one."""

    __slots__ = ("maildir", "tmp", "name", "fd", "size", "lines", "final", "error")

    def __init__(self, maildir: str, tmp: str, name: str, fd: int) -> None:
        self.maildir = maildir
        self.tmp = tmp
        self.name = name
        self.fd: int | None = fd
        self.size = 0
        self.lines = 0
        self.final: str | None = None
        self.error: MaildirError | None = None


def begin(maildir: Path | str, chunks: Iterable[bytes], *, return_path: str,
          delivered_to: str, hostname: str, now: float, quota: int = 0,
          size_hint: int | None = None, ops: FileOps | None = None,
          pending_bytes: int = 0) -> Pending:
    """Steps 1-2: a unique tmp/ file with the two header lines and the message, unsynced.

    `pending_bytes`: bytes already on their way into this Maildir in the same batch (quota).
    Raises MaildirError (temporary); nothing is left behind then."""
    ops = ops or FileOps()
    maildir = str(maildir)
    header = ("Return-Path: <%s>\nDelivered-To: %s\n" % (return_path, delivered_to)).encode(
        "utf-8", "surrogateescape")
    if quota > 0:
        expected = len(header) + (size_hint or 0)
        if usage(maildir) + pending_bytes + expected > quota:
            raise MaildirError(TEXT_FULL)
    name = unique_name(now, hostname)
    tmp = os.path.join(maildir, "tmp", name)
    try:
        try:
            fd = ops.open_excl(tmp)
        except FileNotFoundError:
            # A new user's first message (or a Maildir someone removed): create it. Checking
            # for the directories before every delivery would cost six system calls each.
            make_dirs(maildir)
            fd = ops.open_excl(tmp)
    except OSError as e:
        raise MaildirError(_error_text(e)) from e
    p = Pending(maildir, tmp, name, fd)
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
    """Steps 3-5 for several messages: fsync each file, link each into new/, then fsync each
    new/ directory once for all the names linked into it (a group commit: N messages to one
    Maildir cost N file fsyncs and one directory fsync, and the file fsyncs after the first
    find their data already written by the journal commit it caused).

    Each Pending ends with `final` (its name in new/, durable) or `error` (a MaildirError;
    nothing of it is left in new/), independently of the others."""
    ops = ops or FileOps()
    if len(pendings) > 1:
        for p in pendings:
            if p.error is None and p.fd is not None:
                ops.start_writeback(p.fd)
    for p in pendings:                                     # 3. fsync and close
        if p.error is not None or p.fd is None:
            continue
        try:
            ops.fsync(p.fd)
        except OSError as e:
            p.error = MaildirError(_error_text(e))
            discard(p, ops)
            continue
        fd, p.fd = p.fd, None
        try:
            ops.close(fd)
        except OSError as e:
            p.error = MaildirError(_error_text(e))
            discard(p, ops)
    linked: dict[str, list[Pending]] = {}
    for p in pendings:                                     # 4. rename into new/
        if p.error is not None:
            continue
        final = "%s,S=%d,W=%d" % (p.name, p.size, p.size + p.lines)
        new_dir = os.path.join(p.maildir, "new")
        try:
            try:
                ops.rename(p.tmp, os.path.join(new_dir, final))
            except FileNotFoundError:
                make_dirs(p.maildir)                        # new/ went missing meanwhile
                ops.rename(p.tmp, os.path.join(new_dir, final))
        except OSError as e:
            p.error = MaildirError(_error_text(e))
            discard(p, ops)
            continue
        p.final = final
        linked.setdefault(new_dir, []).append(p)
    for new_dir, group in linked.items():                  # 5. fsync new/, once per Maildir
        try:
            ops.fsync_dir(new_dir)
        except OSError as e:
            # not known durable: take them back so a retry cannot leave two copies
            for p in group:
                try:
                    ops.unlink(os.path.join(new_dir, p.final))
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
