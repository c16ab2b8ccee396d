"""The data directory: who may read it, who must own it, and how a failure about it reads.

No Twisted here: the server's start-up (mailappliance.startup), the user store and the
`mailappliance` command all use it.

Modes. The data directory holds the user store (bcrypt hashes of every password), the queue
and, by default, the mailboxes: nobody but the server's user has any business in it, as
qmail's queue was 0750 qmailq and vpopmail's domains 0700 vpopmail. What the server or the
command creates is made private at creation, by explicit modes (the umask can only take bits
away): the data directory 0700, users.sqlite 0600 (SQLite gives its -wal and -shm files the
mode of the database file). The modes of files that already exist are tightened only for the
user store's own files (users.sqlite, -wal, -shm), which hold the hashes; the data directory
itself keeps whatever mode the operator gave it (`mailappliance check` reports a directory
others can read), and no owner is ever changed here.

Owner. A server started as root with ``twistd --uid/--gid`` runs as that user after binding its
ports: a data directory it finds must already belong to that user (``mailappliance domain add``
run as root before the first start makes one that root owns). The server never changes the
owner of a directory it finds; it refuses to start with one line that says what to run.
"""

from __future__ import annotations

import os
import pwd
import sqlite3
import stat
from pathlib import Path

# Modes of what the server and the `mailappliance` command create (see the module docstring).
DIR_MODE = 0o700
FILE_MODE = 0o600
# Bits that must not be set on the user store's files: group and other may not read them.
PRIVATE_MASK = 0o077

STORE_FILES = ("users.sqlite", "users.sqlite-wal", "users.sqlite-shm")


def make_dir(path: Path, owner: tuple[int, int] | None = None) -> bool:
    """Create the data directory (and missing parents) if it does not exist, mode DIR_MODE,
    and give the new directory, never an existing one, to `owner` (uid, gid). True if made."""
    path = Path(path)
    if path.is_dir():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    if owner is not None:
        os.chown(path, owner[0], owner[1])
    return True


def private_file(path: Path) -> None:
    """Create `path` empty with FILE_MODE if it does not exist (before SQLite creates it with
    its default 0644), so its -wal and -shm files inherit the mode too."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def tighten(*paths: Path) -> list[Path]:
    """Take group and other bits off each existing path that has any; returns those changed.
    A file this process may not chmod (another user's, without root) is left as it is."""
    changed = []
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & PRIVATE_MASK:
            continue
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~PRIVATE_MASK)
        except OSError:
            continue
        changed.append(Path(path))
    return changed


def private_store(data: Path) -> list[Path]:
    """The user store's files: users.sqlite created 0600 if missing, and the existing ones
    (with -wal and -shm) tightened to owner-only. Returns what was tightened."""
    data = Path(data)
    private_file(data / STORE_FILES[0])
    return tighten(*(data / name for name in STORE_FILES))


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _groups(uid: int, gid: int | None) -> set[int]:
    """The groups a process of `uid` has after twistd's switch (initgroups)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return {gid} if gid is not None else set()
    primary = entry.pw_gid if gid is None else gid
    try:
        return set(os.getgrouplist(entry.pw_name, primary))
    except OSError:
        return {primary}


def _may_enter(st: os.stat_result, uid: int, groups: set[int]) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def owner_problem(data: Path, uid: int, gid: int | None = None) -> str | None:
    """None if a server running as `uid` (group `gid`) may use the data directory `data`: it
    belongs to `uid` (or does not exist yet) and every directory above it lets that user in.
    Else the one line that says what is wrong and what to do."""
    data = Path(data)
    user = _user_name(uid)
    try:
        st = os.stat(data)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"data directory {data}: {e.strerror}"
    if st is not None and st.st_uid != uid:
        owner = _user_name(st.st_uid)
        return (f"data directory {data} belongs to {owner} (uid {st.st_uid}), not to {user} "
                f"(uid {uid}) that the server runs as (--uid); the server does not change the "
                f"owner of a directory it finds: chown -R {user}: {data}")
    groups = _groups(uid, gid)
    for parent in reversed(Path(os.path.abspath(data)).parents):
        try:
            pst = os.stat(parent)
        except OSError:
            break                     # a missing parent: made with the data directory
        if not _may_enter(pst, uid, groups):
            return (f"data directory {data}: {user} (uid {uid}) that the server runs as "
                    f"(--uid) may not enter {parent} (mode {stat.S_IMODE(pst.st_mode):04o}, "
                    f"owner {_user_name(pst.st_uid)}); let it in or move the data directory")
    return None


def _no_space(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail == 0 or st.f_favail == 0


def describe(exc: BaseException, store: Path | None = None) -> str:
    """One line for an error about the data directory's files: the file and the system's
    words (`/var/lib/mailappliance/queue/tmp/1: No space left on device`). `store` names the
    SQLite file for sqlite3 errors, which do not carry it."""
    if isinstance(exc, OSError):
        if exc.errno:
            text = exc.strerror or os.strerror(exc.errno)
        else:
            text = str(exc)
        if exc.filename is not None:
            return f"{os.fsdecode(exc.filename)}: {text}"
        return text or type(exc).__name__
    if isinstance(exc, sqlite3.Error):
        # SQLite reports a full disk as "disk I/O error" when a WAL write fails: say so.
        text = str(exc) or type(exc).__name__
        if store is None:
            return f"user store: {text}"
        if "full" not in text and _no_space(Path(store).parent):
            text += " (no space left on its file system)"
        return f"{store}: {text}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

