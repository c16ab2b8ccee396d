"""One server per data directory: an exclusive lock on data/run/lock for the process's life.

Two servers on one data directory would share the queue trigger, the admin socket, the log
and run/ready.json, and each would deliver the other's messages. The lock is taken when the
service tree is built (before anything listens or writes), held through the privilege drop
(the descriptor stays open) and released by the kernel when the process ends, kill -9
included, so there is no stale lock to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyRunning(SystemExit):
    """Raised from make_service; SystemExit so twistd prints the one line and exits 1."""


def lock_path(data: Path) -> Path:
    return data / "run" / "lock"


def acquire(data: Path) -> int:
    path = lock_path(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            other = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        finally:
            os.close(fd)
        raise AlreadyRunning(f"mailappliance: another server (pid {other}) is running on "
                             f"{data}; stop it first") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:          # a full disk: name the file in the start-up failure's line
        os.close(fd)
        raise OSError(e.errno, e.strerror, str(path)) from None
    return fd


def hold_lock(settings) -> int:
    """make_service's first part: the lock (its descriptor, open for the process's life),
    handed with its directory to the data directory's owner."""
    from mailappliance.privileges import adopt_for_data
    fd = acquire(settings.data)
    adopt_for_data(settings.data, lock_path(settings.data).parent, lock_path(settings.data))
    return fd
