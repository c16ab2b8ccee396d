"""Maildir delivery: the only writer of mailboxes (a store: blocking file I/O, no Twisted).

The Maildir protocol (D. J. Bernstein, https://cr.yp.to/proto/maildir.html, as qmail-local
and vdelivermail do it):

1. create ``tmp/<time>.M<usec>P<pid>Q<seq>.<host>`` with O_EXCL (unique: time, process, a
   per-process sequence number and the host name, '/' and ':' escaped as \\057 and \\072);
2. write ``Return-Path: <sender>`` and ``Delivered-To: <recipient>`` and then the message;
3. fsync and close the file;
4. link it into ``new/`` (never replacing anything), unlink the tmp/ name;
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

from mailappliance.queue.store import FileOps, write_all

_seq = itertools.count(1)

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
    return "%d.M%dP%dQ%d.%s" % (sec, usec, os.getpid(), next(_seq), _safe_host(hostname))


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


def deliver(maildir: Path | str, chunks: Iterable[bytes], *, return_path: str,
            delivered_to: str, hostname: str, now: float, quota: int = 0,
            size_hint: int | None = None, ops: FileOps | None = None) -> str:
    """Deliver one message; return its name in new/.  Raises MaildirError (temporary)."""
    ops = ops or FileOps()
    maildir = str(maildir)
    try:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    except OSError as e:
        raise MaildirError(_error_text(e)) from e
    header = ("Return-Path: <%s>\nDelivered-To: %s\n" % (return_path, delivered_to)).encode(
        "utf-8", "surrogateescape")
    if quota > 0:
        expected = len(header) + (size_hint or 0)
        if usage(maildir) + expected > quota:
            raise MaildirError(TEXT_FULL)
    name = unique_name(now, hostname)
    tmp = os.path.join(maildir, "tmp", name)
    try:
        fd = ops.open_excl(tmp)
    except OSError as e:
        raise MaildirError(_error_text(e)) from e
    size, lines, closed = 0, 0, False
    try:
        for chunk in itertools.chain((header,), chunks):
            write_all(ops, fd, chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
        ops.fsync(fd)
        closed = True
        ops.close(fd)
        final = "%s,S=%d,W=%d" % (name, size, size + lines)
        new = os.path.join(maildir, "new", final)
        os.link(tmp, new)
        try:
            ops.unlink(tmp)
        except OSError:
            pass  # a leftover tmp/ name is harmless: the message is already in new/
        try:
            ops.fsync_dir(os.path.join(maildir, "new"))
        except OSError as e:
            # not known durable: take it back so a retry cannot leave two copies
            try:
                ops.unlink(new)
            except OSError:
                pass
            raise MaildirError(_error_text(e)) from e
        return final
    except OSError as e:
        if not closed:
            try:
                ops.close(fd)
            except OSError:
                pass
        try:
            ops.unlink(tmp)
        except OSError:
            pass
        raise MaildirError(_error_text(e)) from e
