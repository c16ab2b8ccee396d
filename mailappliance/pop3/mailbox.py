"""A Maildir as qmail-pop3d serves it; a store (blocking file I/O, no Twisted).

- The listing is new/ and cur/ together, sorted by delivery time (file mtime, then name), as
  qmail-pop3d's maildir_scan does. Listing reads directory entries and stats files; it never
  opens a message, so a mailbox of 10,000 messages lists in milliseconds and bounded memory.
- A message's size is the Dovecot `,W=` wire size in its name when there is one, else the
  file's size (qmail-pop3d reports st_size too; RFC 1939 allows the octet count to differ
  from the CRLF form sent).
- UIDL is the base name before ':' (stable across the new/ -> cur/ rename). A base name that is
  not a valid RFC 1939 unique-id (1-70 characters 0x21-0x7E) gets a stable SHA-1 of itself.
- Nothing changes on disk before QUIT: update() unlinks the messages marked deleted and moves
  the rest from new/ to cur/ with ":2," appended, as qmail-pop3d does, then fsyncs the two
  directories so the +OK to QUIT means the deletions are on disk.
- One session at a time per mailbox: lock() takes flock(LOCK_EX | LOCK_NB) on the Maildir
  directory itself (no lock file inside the Maildir). A second POP3 session, in this process or
  another server process, gets MailboxBusy, and the client a "-ERR [IN-USE]" (RFC 2449).
  Delivery does not take this lock and is unaffected: new messages just appear in the next
  session. (qmail-pop3d itself takes no lock and lets two sessions race; a clear -ERR is
  easier to reason about than two clients deleting each other's view.)
- Symlinks inside the Maildir are neither listed nor opened (O_NOFOLLOW).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

# RFC 1939 section 7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
UID_MAX_LENGTH = 70
# qmail-pop3d's flag suffix for a message moved from new/ to cur/ (Maildir "info" version 2).
CUR_SUFFIX = ":2,"
# Bytes read from a message file per step of a RETR; also the fast-path threshold: a message
# that fits in one read is sent with one write. 64 KiB matches the socket buffers Twisted uses.
READ_CHUNK = 65536


class MailboxError(Exception):
    pass


class MailboxBusy(MailboxError):
    pass


class MessageGone(MailboxError):
    pass


@dataclass(frozen=True, slots=True)
class MessageInfo:
    uid: str
    size: int
    name: str          # "new/<file>" or "cur/<file>", relative to the Maildir
    mtime_ns: int


def uid_for(base: str) -> str:
    # isascii + isprintable + no space == every character in 0x21..0x7E.
    if (1 <= len(base) <= UID_MAX_LENGTH and base.isascii() and base.isprintable()
            and " " not in base):
        return base
    return hashlib.sha1(os.fsencode(base)).hexdigest()


def size_from_name(base: str) -> int | None:
    """The `,W=<n>` (wire size, CRLF line ends) field of a Maildir++/Dovecot file name."""
    for part in base.split(",")[1:]:
        if part.startswith("W=") and part[2:].isdigit() and len(part) < 20:
            return int(part[2:])
    return None


class Maildir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._prefix = os.fspath(self.path) + "/"    # hot paths join strings, not Paths
        self._lock_fd: int | None = None

    # -- the session lock ------------------------------------------------------------------
    def lock(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise MailboxError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MailboxBusy(str(self.path)) from None
            raise MailboxError(f"cannot lock {self.path}: {e.strerror}") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)      # closing the descriptor releases the flock

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    # -- listing -----------------------------------------------------------------------------
    def scan(self) -> list[MessageInfo]:
        found: list[MessageInfo] = []
        for sub in ("new", "cur"):
            try:
                it = os.scandir(self._prefix + sub)
            except FileNotFoundError:
                raise MailboxError(f"{self.path / sub} is missing") from None
            with it:
                for entry in it:
                    name = entry.name
                    if name[0] == ".":
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue          # removed while we listed
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    base = name.split(":", 1)[0]
                    size = size_from_name(base) if ",W=" in base else None
                    found.append(MessageInfo(uid_for(base), st.st_size if size is None else size,
                                             f"{sub}/{name}", st.st_mtime_ns))
        found.sort(key=lambda m: (m.mtime_ns, m.name))
        return found

    # -- reading ---------------------------------------------------------------------------
    def open_fd(self, message: MessageInfo) -> int:
        """A read-only descriptor of the message file (the caller closes it); MessageGone if
        the file is missing or is a symlink."""
        try:
            return os.open(self._prefix + message.name,
                           os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MessageGone(message.name) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise MessageGone(message.name) from None
            raise MailboxError(f"cannot open {message.name}: {e.strerror}") from None

    def open(self, message: MessageInfo):
        """An unbuffered binary file object (each read() is one read(2))."""
        return os.fdopen(self.open_fd(message), "rb", buffering=0)

    # -- QUIT ------------------------------------------------------------------------------
    def update(self, deleted, kept) -> int:
        """Apply a session's QUIT; returns how many deletions failed (0 = all done)."""
        failures = 0
        touched: set[str] = set()
        prefix = self._prefix
        for m in deleted:
            try:
                os.unlink(prefix + m.name)
                touched.add(m.name.split("/", 1)[0])
            except FileNotFoundError:
                pass              # already gone: the client's wish holds
            except OSError:
                failures += 1
        for m in kept:
            sub, _, name = m.name.partition("/")
            if sub != "new":
                continue
            target = name if ":" in name else name + CUR_SUFFIX
            try:
                os.rename(prefix + m.name, prefix + "cur/" + target)
                touched.update(("new", "cur"))
            except OSError:
                pass              # qmail-pop3d: "if it fails, bummer" -- it stays in new/
        for sub in sorted(touched):
            try:
                fd = os.open(self.path / sub, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                failures += 1 if sub in {m.name.split("/", 1)[0] for m in deleted} else 0
        return failures


def open_session(path: Path | str) -> tuple[Maildir, list[MessageInfo]]:
    """Lock and list a mailbox (run in a thread). MailboxBusy / MailboxError on failure."""
    box = Maildir(path)
    box.lock()
    try:
        return box, box.scan()
    except BaseException:
        box.unlock()
        raise
