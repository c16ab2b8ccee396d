"""POP3's one-session-per-mailbox lock across the nodes of a site (docs/SEVERAL_NODES.md).

One node (the embedded SQLite directory) keeps mailbox.py's flock on the Maildir directory.
Several nodes on one PostgreSQL database share a mailbox tree over NFS, where flock neither
excludes a session on another NFS client nor, with the default mount options, works on a
directory at all (Linux sends it to the server as a byte-range lock, which NFSv4 grants only
on an open file). There the lock is a PostgreSQL advisory lock (users/pgstore.py
PgMailboxLocks) keyed by the mailbox's address, which also refuses a second session of the
same node, and is gone by itself if the node dies. A session whose lock connection broke
meanwhile (its lock is gone) does not apply its QUIT: update() reports every deletion as
failed, and the client gets -ERR [SYS/TEMP] and finds its mail again at the next login.
Blocking (a thread), except unlock(), which the reactor calls at connectionLost.
"""

from __future__ import annotations

from pathlib import Path

from mailappliance.pop3.mailbox import Maildir, MailboxBusy, MailboxError, MessageInfo


class NodeLockedMaildir(Maildir):
    def __init__(self, path: Path | str, locks, name: str) -> None:
        super().__init__(path)
        self._locks = locks          # PgMailboxLocks (try_lock, held, unlock)
        self._name = name            # the mailbox's address: the lock's key
        self._token = None

    def lock(self) -> None:
        if self.locked:
            return
        try:
            token = self._locks.try_lock(self._name)
        except OSError as e:                 # DirectoryUnavailable: -ERR [SYS/TEMP]
            raise MailboxError(f"cannot lock {self._name} across nodes: {e}") from None
        if token is None:                    # a session on this node or another one
            raise MailboxBusy(f"{self.path}")
        self._token = token

    def unlock(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            self._locks.unlock(token)        # queued: never blocks the caller

    @property
    def locked(self) -> bool:
        return self._token is not None

    def update(self, deleted, kept) -> int:
        if self._token is None or not self._locks.held(self._token):
            # Another node may have this mailbox now: change nothing.
            return max(1, len(deleted))
        return super().update(deleted, kept)


def open_node_session(path: Path | str, locks, name: str
                      ) -> tuple[Maildir, list[MessageInfo]]:
    """mailbox.open_session with the cross-node lock (run in a thread)."""
    box = NodeLockedMaildir(path, locks, name)
    box.lock()
    try:
        return box, box.scan()
    except BaseException:
        box.unlock()
        raise
