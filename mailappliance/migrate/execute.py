"""Apply a Plan: domains, users and aliases through the UserStore; Maildirs moved or hard-linked
into the data directory with every file name kept (a store: blocking I/O, no Twisted).

Restartable without a journal, because every step is idempotent and each leaves the tree in
a state the next run recognises, whatever moment a kill -9 picks:

* a domain or user that exists is left as it is (one SQLite transaction adds each);
* an alias is written as the plan says (an upsert);
* a message is placed with link(2), which never replaces anything: a name already there that
  is the same file (same inode) was placed by an earlier run and is counted as present; a
  move is link + unlink of the source (qmail-local's own way of never losing a name), so a
  kill between the two leaves two names of one file and the next run only unlinks the
  source. Across file systems (move only) the copy goes to the Maildir's tmp/, is fsynced,
  linked to its name and only then is the source unlinked; a name that is already there
  with the source's size is the earlier run's copy.

POP3 UIDLs are the file names up to ':' (pop3/mailbox.py, like qmail-pop3d), and link/rename
keep names and modification times (the POP3 listing order), so clients see the same mailbox.
new/, cur/ and the flags after ':2,' keep their meaning. tmp/ holds deliveries that never
finished: they are left where they are and counted.

Ownership: run as root with a data directory owned by the server's user, everything created
or placed is given to that user (with --link the old tree's name for the file changes owner
too: it is the same inode).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mailappliance.migrate.qmailfiles import Note
from mailappliance.migrate.source import Plan, PlannedUser
from mailappliance.pop3.mailbox import uid_for
from mailappliance.privileges import adopt
from mailappliance.users import passwords
from mailappliance.users.store import ROLE_ALIASES, StoreError, User, UserStore

MAILDIR_SUBDIRS = ("tmp", "new", "cur")
# The environment variable of the interruption tests: kill -9 this process after that many
# steps (store writes and placed files). Never set it in production.
KILL_AFTER_ENV = "MAILAPPLIANCE_IMPORT_KILL_AFTER"
# Problems listed one by one per mailbox; more are counted.
MAX_NOTES_PER_MAILDIR = 20


@dataclass
class MailStats:
    messages: int = 0        # files placed in new/ or cur/ (of any folder) by this run
    present: int = 0         # already in place from an earlier run
    bytes: int = 0           # of messages placed or present
    other_files: int = 0     # other files of the Maildir tree (maildirsize, folder files)
    tmp_left: int = 0        # unfinished deliveries in tmp/, left in the old tree
    uid_changed: int = 0     # names POP3 cannot use as UIDL as they are (> 70 characters)
    problems: int = 0

    def add(self, other: "MailStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Outcome:
    dry_run: bool
    link: bool
    domains: dict[str, str] = field(default_factory=dict)   # name -> "added" | "present"
    users: dict[str, str] = field(default_factory=dict)     # address -> "added" | "present"
    aliases: dict[str, str] = field(default_factory=dict)   # address -> "set" | "present"
    mail: dict[str, MailStats] = field(default_factory=dict)
    total: MailStats = field(default_factory=MailStats)
    notes: list[Note] = field(default_factory=list)
    cross_device: bool = False


class ReadOnlyStore:
    """What the store holds, for --dry-run: users.sqlite opened read-only (or nothing when it
    does not exist), so a dry run writes no file at all."""

    def __init__(self, data: Path) -> None:
        path = data / "users.sqlite"
        self.db = None
        if path.is_file():
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def _one(self, sql: str, args: tuple):
        if self.db is None:
            return None
        try:
            return self.db.execute(sql, args).fetchone()
        except sqlite3.Error:
            return None

    def has_domain(self, name: str) -> bool:
        return self._one("SELECT 1 FROM domains WHERE name=?", (name,)) is not None

    def get_user(self, address: str):
        local, _, domain = address.partition("@")
        row = self._one("SELECT password_hash FROM users WHERE domain=? AND local=?",
                        (domain, local))
        return None if row is None else row

    def get_alias(self, address: str):
        import json
        local, _, domain = address.partition("@")
        row = self._one("SELECT targets FROM aliases WHERE domain=? AND local=?", (domain, local))
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


class Importer:
    def __init__(self, store, data: Path, *, link: bool, dry_run: bool,
                 owner: tuple[int, int] | None = None, kill_after: int | None = None,
                 bcrypt_cost: int = passwords.DEFAULT_COST,
                 hash_threads: int | None = None) -> None:
        self.store = store
        self.data = data
        self.link = link
        self.dry_run = dry_run
        self.owner = owner
        self.kill_after = kill_after
        self.bcrypt_cost = bcrypt_cost
        self.hash_threads = hash_threads or os.cpu_count() or 1
        self.steps = 0
        self.outcome = Outcome(dry_run, link)

    # -- the test hook ----------------------------------------------------------------------
    def _step(self) -> None:
        self.steps += 1
        if self.kill_after is not None and self.steps >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def _note(self, kind: str, where: str, text: str) -> None:
        self.outcome.notes.append(Note(kind, where, text))

    # -- the whole plan ---------------------------------------------------------------------
    def run(self, plan: Plan) -> Outcome:
        for domain in plan.domains:
            self._domain(domain.name)
        # Role names first, postmaster first of all: the store gives the role aliases
        # (postmaster, abuse, mailer-daemon) to a domain's first user, and an address is a
        # user or an alias, never both (see _user).
        order = {name: i for i, name in enumerate(ROLE_ALIASES)}
        self._users([u for d in plan.domains if self.outcome.domains.get(d.name)
                     for u in sorted(d.users, key=lambda u: order.get(u.local, len(order)))])
        for alias in plan.aliases:
            self._alias(alias.address, alias.targets, alias.where)
        for user in plan.users:
            if user.address in self.outcome.users:
                self._mailbox(user)
        return self.outcome

    def _domain(self, name: str) -> None:
        if self.store.has_domain(name):
            self.outcome.domains[name] = "present"
            return
        if self.dry_run:
            self.outcome.domains[name] = "added"
            return
        try:
            self.store.add_domain(name)
        except StoreError as e:
            self._note("error", name, f"domain not added: {e}")
            return
        adopt(self.owner, self.store.domains_dir, self.store.domains_dir / name)
        self.outcome.domains[name] = "added"
        self._step()

    def _users(self, users: list[PlannedUser]) -> None:
        todo = []
        for u in users:
            if self.store.get_user(u.address) is not None:
                self.outcome.users[u.address] = "present"
            elif self.dry_run:
                self.outcome.users[u.address] = "added"
            else:
                todo.append(u)
        if not todo:
            return
        # bcrypt of the clear-text fields: tens of milliseconds each by design, and bcrypt
        # releases the GIL, so all cores share them.
        clear = [u for u in todo if u.clear is not None]
        hashes: dict[str, str] = {}
        if clear:
            with ThreadPoolExecutor(self.hash_threads) as pool:
                for u, h in zip(clear, pool.map(
                        lambda u: passwords.hash_password(u.clear, self.bcrypt_cost), clear)):
                    hashes[u.address] = h
        for u in todo:
            hashed = hashes.get(u.address) or u.password_hash
            try:
                if u.local in ROLE_ALIASES and self.store.get_alias(u.address) is not None:
                    # The role alias the store made for the domain's first user: vpopmail
                    # had a real mailbox of that name, which keeps its mail and password.
                    self.store.del_alias(u.address)
                user = self.store.add_user(u.address, None, u.quota, password_hash=hashed)
            except StoreError as e:
                self._note("error", u.where, f"{u.address}: not added: {e}")
                continue
            u.clear = None
            self._adopt_maildir(user)
            self.outcome.users[u.address] = "added"
            self._step()

    def _adopt_maildir(self, user: User) -> None:
        if self.owner is None:
            return
        top = self.store.domains_dir / user.domain / user.local
        adopt(self.owner, top, user.maildir, *(user.maildir / s for s in MAILDIR_SUBDIRS))

    def _alias(self, address: str, targets: list[str], where: str) -> None:
        if self.store.get_alias(address) == targets:
            self.outcome.aliases[address] = "present"
            return
        if self.dry_run:
            self.outcome.aliases[address] = "set"
            return
        try:
            self.store.add_alias(address, targets)
        except StoreError as e:
            self._note("error", where, f"alias {address}: not added: {e}")
            return
        self.outcome.aliases[address] = "set"
        self._step()

    # -- mailboxes ----------------------------------------------------------------------------
    def _mailbox(self, user: PlannedUser) -> None:
        stats = MailStats()
        self.outcome.mail[user.address] = stats
        if user.maildir is None:
            return
        dst = self.data / "domains" / user.domain / user.local / "Maildir"
        if not self.dry_run:
            dst = self.store.maildir_for(user.local, user.domain)
        walk = _Walk(self, user, stats, dst)
        walk.run(user.maildir)
        self.outcome.total.add(stats)
        if stats.uid_changed:
            self._note("warning", str(user.maildir), f"{user.address}: {stats.uid_changed} "
                       "message names are longer than POP3's 70-character UIDL: those UIDLs "
                       "change, and the client downloads those messages again")
        if stats.tmp_left:
            what = "delivery" if stats.tmp_left == 1 else "deliveries"
            self._note("info", str(user.maildir / "tmp"), f"{user.address}: {stats.tmp_left} "
                       f"unfinished {what} in tmp/ left in the old tree")


class _Walk:
    """One Maildir tree (the mailbox and its Maildir++ folders), placed file by file."""

    def __init__(self, importer: Importer, user: PlannedUser, stats: MailStats, dst: Path):
        self.imp = importer
        self.user = user
        self.stats = stats
        self.dst_root = dst
        self.noted = 0
        self.cross_device: bool | None = None

    def problem(self, where: str, text: str) -> None:
        self.stats.problems += 1
        if self.noted < MAX_NOTES_PER_MAILDIR:
            self.noted += 1
            self.imp._note("error", where, f"{self.user.address}: {text}")
        elif self.noted == MAX_NOTES_PER_MAILDIR:
            self.noted += 1
            self.imp._note("error", str(self.user.maildir),
                           f"{self.user.address}: more problems in this Maildir not listed")

    def run(self, src_root: Path) -> None:
        stack = [(os.fspath(src_root), os.fspath(self.dst_root), 0)]
        while stack:
            src, dst, depth = stack.pop()
            if not self.imp.dry_run and not self.mkdir(dst):
                continue
            try:
                listing = os.scandir(src)
            except OSError as e:
                self.problem(src, f"cannot list: {e.strerror or e}")
                continue
            base = os.path.basename(src)
            in_mail_dir = base in ("new", "cur")
            top_level = depth == 1 and in_mail_dir
            # Read lazily: a mailbox of a million messages is never held in memory. A move
            # unlinks only names this listing has already returned, which readdir allows.
            with listing:
                self.entries(listing, dst, depth, in_mail_dir, top_level, stack)

    def entries(self, listing, dst: str, depth: int, in_mail_dir: bool, top_level: bool,
                stack: list) -> None:
        for entry in listing:
            if entry.is_symlink():
                self.problem(entry.path, "symbolic link not carried over")
            elif entry.is_dir(follow_symlinks=False):
                if entry.name == "tmp":
                    self.tmp(entry.path, os.path.join(dst, "tmp"))
                else:
                    stack.append((entry.path, os.path.join(dst, entry.name), depth + 1))
            elif entry.is_file(follow_symlinks=False):
                self.file(entry, os.path.join(dst, entry.name), in_mail_dir, top_level)
            else:
                self.problem(entry.path, "not a regular file: not carried over")

    def mkdir(self, path: str) -> bool:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return True
        except OSError as e:
            self.problem(path, f"cannot create: {e.strerror or e}")
            return False
        adopt(self.imp.owner, Path(path))
        return True

    def tmp(self, src: str, dst: str) -> None:
        if not self.imp.dry_run:
            self.mkdir(dst)
        try:
            with os.scandir(src) as it:
                self.stats.tmp_left += sum(1 for e in it if not e.is_dir(follow_symlinks=False))
        except OSError as e:
            self.problem(src, f"cannot list: {e.strerror or e}")

    def file(self, entry: os.DirEntry, dst: str, message: bool, top_level: bool) -> None:
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except OSError as e:
            self.problem(entry.path, f"cannot stat: {e.strerror or e}")
            return
        if top_level:
            base = entry.name.split(":", 1)[0]
            if uid_for(base) != base:
                self.stats.uid_changed += 1
        if self.imp.dry_run:
            result = "placed"
        else:
            result = self.place(entry.path, dst, size)
        if result is None:
            return
        if message:
            if result == "placed":
                self.stats.messages += 1
            else:
                self.stats.present += 1
            self.stats.bytes += size
        else:
            self.stats.other_files += 1
        if result == "placed" and not self.imp.dry_run:
            self.imp._step()

    def place(self, src: str, dst: str, size: int) -> str | None:
        """-> "placed", "present", or None after a problem."""
        if self.cross_device is None:
            self.cross_device = os.stat(os.path.dirname(src)).st_dev != \
                os.stat(os.path.dirname(dst)).st_dev
            if self.cross_device:
                self.imp.outcome.cross_device = True
        try:
            if self.cross_device:
                if self.imp.link:
                    self.problem(src, "--link needs the data directory on the same file system")
                    return None
                return self.copy(src, dst, size)
            try:
                os.link(src, dst, follow_symlinks=False)
            except FileExistsError:
                if not os.path.samestat(os.lstat(src), os.lstat(dst)):
                    self.problem(dst, "a different file of that name is already there: "
                                 "left as it is")
                    return None
                result = "present"
            else:
                result = "placed"
                adopt_file(self.imp.owner, dst)
            if not self.imp.link:
                os.unlink(src)
            return result
        except OSError as e:
            self.problem(src, f"{e.strerror or e}")
            return None

    def copy(self, src: str, dst: str, size: int) -> str | None:
        """Move across file systems: copy to tmp/, fsync, link to the name, unlink the source."""
        try:
            st = os.lstat(dst)
        except FileNotFoundError:
            st = None
        if st is not None:
            if st.st_size != size:
                self.problem(dst, "a different file of that name is already there: "
                             "left as it is")
                return None
            os.unlink(src)
            return "present"
        tmp = os.path.join(self.dst_root, "tmp", os.path.basename(dst).replace(":", "_")
                           + f".import{os.getpid()}")
        shutil.copy2(src, tmp, follow_symlinks=False)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        adopt_file(self.imp.owner, tmp)
        try:
            os.link(tmp, dst)
        except FileExistsError:
            os.unlink(tmp)
            self.problem(dst, "a different file of that name is already there: left as it is")
            return None
        os.unlink(tmp)
        os.unlink(src)
        return "placed"


def adopt_file(owner: tuple[int, int] | None, path: str) -> None:
    if owner is not None:
        try:
            os.lchown(path, owner[0], owner[1])
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


def open_store(data: Path, bcrypt_cost: int, owner: tuple[int, int] | None,
               settings=None):
    """The user store, its files given to the data directory's owner (run as root, SQLite
    creates them as root; SQLite itself keeps the -wal and -shm files with the database's
    owner once that is right). With `[users] database` a PostgreSQL URI in `settings`, the
    shared database (its schema created or upgraded) and the `mailboxes` tree."""
    database = getattr(getattr(settings, "users", None), "database", "")
    if database:
        from mailappliance.users.backend import open_directory
        store = open_directory(database, data, settings.mailboxes or "", bcrypt_cost)
        adopt(owner, store.domains_dir)
        return store
    store = UserStore(data, bcrypt_cost)
    # One fsync per added user (synchronous=FULL, the server's setting) made 10,000 users take
    # most of a minute. WAL with synchronous=NORMAL still survives a kill of this process; a
    # power cut can lose the last commits, which the next run adds again, and the import ends
    # with a sync() before it reports. This connection is the importer's alone.
    store._db().conn.execute("PRAGMA synchronous=NORMAL")
    adopt(owner, data / "users.sqlite", data / "users.sqlite-wal", data / "users.sqlite-shm",
          data / "users.sqlite-gen", store.domains_dir)
    return store
