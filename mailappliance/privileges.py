"""Who owns the files: the data directory's owner is the user the server runs as.

Started as root with ``twistd --uid/--gid``, the server binds its ports and opens its stores
before twistd drops privileges. Whatever it creates in that window (the admin socket, the log
directory, SQLite's WAL files) would belong to root and be unusable after the drop. The rule
here is the one qmail's install used for its queue: the operator makes the data directory
belong to the service user (``install -d -o mailappliance -g mailappliance DATA``), and
anything the server creates there as root is handed to that owner. The `mailappliance`
command follows the same rule: run as root, it switches to the data directory's owner before
touching the store, so Maildirs it creates belong to the user that delivers into them.

Nothing here acts unless the process runs as root and the data directory belongs to someone
else; an unprivileged server never changes ownership.

No Twisted here: the `mailappliance` store commands and `mailappliance-sendmail` import this
module without the server (the service that hands files over at start-up is
mailappliance.service.AdoptService).
"""

from __future__ import annotations

import os
from pathlib import Path


def data_owner(data: Path) -> tuple[int, int] | None:
    """(uid, gid) to hand files to, or None when nothing should change hands."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(data)
    except OSError:
        return None
    if st.st_uid == 0:
        return None
    return st.st_uid, st.st_gid


def adopt(owner: tuple[int, int] | None, *paths: Path, gid: int | None = None) -> None:
    """Give `paths` (not following symlinks) to `owner`; `gid` overrides the group."""
    if owner is None:
        return
    uid, group = owner
    for path in paths:
        try:
            os.chown(path, uid, group if gid is None else gid, follow_symlinks=False)
        except FileNotFoundError:
            pass


def adopt_for_data(data: Path, *paths: Path) -> None:
    adopt(data_owner(data), *paths)


# Directories under the data directory whose whole tree the server may have created as root
# before the drop (the queue's directories at start-up). Mailboxes are not walked: they can be
# millions of files, and the CLI creates them as the data owner in the first place.
RECURSIVE = ("queue", "run", "log")
# Upper bound on entries handed over at one start, so a huge tree cannot stall start-up.
MAX_ADOPT_ENTRIES = 1_000_000


def adopt_tree(data: Path) -> list[Path]:
    """Hand root-owned entries the server created before the drop to the data owner: the
    entries directly in `data` and the RECURSIVE subtrees. Returns what changed."""
    owner = data_owner(data)
    if owner is None:
        return []
    changed: list[Path] = []
    seen = 0

    def take(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if st.st_uid == 0:
            adopt(owner, path)
            changed.append(path)

    for entry in os.scandir(data):
        take(Path(entry.path))
        if entry.name in RECURSIVE and entry.is_dir(follow_symlinks=False):
            for dirpath, dirnames, filenames in os.walk(entry.path):
                for name in dirnames + filenames:
                    seen += 1
                    if seen > MAX_ADOPT_ENTRIES:
                        return changed
                    take(Path(dirpath) / name)
    return changed


def drop_to_data_owner(data: Path) -> tuple[int, int] | None:
    """For the `mailappliance` command run as root: become the data directory's owner (group
    first, supplementary groups cleared) so every file it creates belongs to the server's user.
    Returns the (uid, gid) switched to, or None if nothing changed."""
    owner = data_owner(data)
    if owner is None:
        return None
    uid, gid = owner
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    return owner
