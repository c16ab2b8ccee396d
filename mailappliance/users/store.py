"""Virtual domains, users and aliases (vpopmail's job), in SQLite under the data directory.

A store: blocking SQLite I/O, no Twisted. WAL mode plus a busy timeout makes it safe for the
server and the `mailappliance` command writing at the same time; every read goes to the
database, so a running server sees a change made by the command at once.

Names are validated before they reach SQL or a path: domains are LDH labels (IDNA for unicode),
local parts a conservative ASCII set, so nothing can escape data/domains/.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mailappliance import datadir
from mailappliance.users import passwords

# RFC 5321 4.5.3.1.1 / 4.5.3.1.2
MAX_LOCAL_PART = 64
MAX_DOMAIN = 253
MAX_LABEL = 63
# A forward list longer than this is a mistake or an amplifier, not an alias.
MAX_ALIAS_TARGETS = 100
# SQLite busy wait: the CLI and the server may both hold the write lock briefly.
BUSY_TIMEOUT_MS = 10_000
# The aliases every domain gets, so mail to them is never lost (RFC 2142).
ROLE_ALIASES = ("postmaster", "abuse", "mailer-daemon")

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LOCAL = re.compile(r"^[a-z0-9!#$&'*+=?^_`{|}~-]+(?:\.[a-z0-9!#$&'*+=?^_`{|}~-]+)*$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    postmaster TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    local TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    quota INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    PRIMARY KEY (domain, local)
);
CREATE TABLE IF NOT EXISTS aliases (
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    local TEXT NOT NULL,
    targets TEXT NOT NULL,
    PRIMARY KEY (domain, local)
);
"""


_MISS = object()


class StoreError(Exception):
    """A refused request; str() is the one line shown to the operator."""


@dataclass(frozen=True)
class User:
    local: str
    domain: str
    quota: int
    maildir: Path
    password_hash: str

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def disabled(self) -> bool:
        """No password can log in (an imported hash that could not be verified)."""
        return passwords.is_disabled(self.password_hash)


def normalize_domain(name: str) -> str:
    """Lower-case, IDNA-encoded, validated domain name; raises StoreError."""
    if not isinstance(name, str) or not name:
        raise StoreError("empty domain name")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise StoreError(f"domain name {name!r} contains control characters")
    name = name.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise StoreError(f"domain name {name!r} is not a valid internationalised name") from None
    if len(name) > MAX_DOMAIN:
        raise StoreError(f"domain name longer than {MAX_DOMAIN} characters")
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise StoreError(f"bad domain name {name!r}: use letters, digits, hyphens and dots "
                         "(at least two labels)")
    return name


def normalize_local(local: str) -> str:
    if not isinstance(local, str) or not local:
        raise StoreError("empty user name")
    if any(ord(c) < 32 or ord(c) == 127 for c in local):
        raise StoreError(f"user name {local!r} contains control characters")
    local = local.lower()
    if len(local) > MAX_LOCAL_PART:
        raise StoreError(f"user name longer than {MAX_LOCAL_PART} characters")
    if not local.isascii() or not _LOCAL.match(local) or local in (".", ".."):
        raise StoreError(f"bad user name {local!r}: use ASCII letters, digits and . _ - + "
                         "(no leading, trailing or double dot, no / or @)")
    return local


def split_address(address: str) -> tuple[str, str]:
    if not isinstance(address, str) or address.count("@") != 1:
        raise StoreError(f"bad address {address!r}: expected user@domain")
    local, domain = address.rsplit("@", 1)
    return normalize_local(local), normalize_domain(domain)


def _check_target(target: str) -> str:
    """Alias targets may be remote; they need a plausible address, not a local user."""
    if not isinstance(target, str) or "@" not in target:
        raise StoreError(f"bad alias target {target!r}: expected user@domain")
    if any(ord(c) < 33 or ord(c) == 127 for c in target) or len(target) > 256:
        raise StoreError(f"bad alias target {target!r}")
    local, domain = target.rsplit("@", 1)
    if not local or len(local) > MAX_LOCAL_PART:
        raise StoreError(f"bad alias target {target!r}")
    return f"{local}@{normalize_domain(domain)}"


class MailboxTree:
    """Where the users' Maildirs are, for both user stores: `domains_dir`/domain/local/Maildir
    (names validated before they get here)."""

    domains_dir: Path

    def maildir_for(self, local: str, domain: str) -> Path:
        return self.domains_dir / domain / local / "Maildir"

    @staticmethod
    def _make_maildir(path: Path) -> None:
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    def count_domain_mail(self, name: str) -> int:
        """Messages in the Maildirs (new/ and cur/) of a domain's users: what `domain del`
        would remove. Bounded by the mailboxes' size; a directory walk, no database."""
        return _count_mail(self.domains_dir / normalize_domain(name))


class UserStore(MailboxTree):
    """The user directory of one data directory.

    `clock` (monotonic seconds) paces the cache's safety-net check of SQLite's data_version,
    `wallclock` stamps new domains and users, and `opener` (os.open's signature) opens the
    generation token file: tests pass their own instead of patching the time and os modules.
    """

    def __init__(self, data_dir: Path | str, bcrypt_cost: int = passwords.DEFAULT_COST, *,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time,
                 opener: Callable[..., int] = os.open) -> None:
        self.data_dir = Path(data_dir)
        self.bcrypt_cost = bcrypt_cost
        self.clock = clock
        self.wallclock = wallclock
        self.path = self.data_dir / "users.sqlite"
        self.domains_dir = self.data_dir / "domains"
        self._local = threading.local()
        # Private to the server's user: the directory 0700 when made here, users.sqlite (and
        # so its -wal and -shm) 0600, existing ones tightened (mailappliance/datadir.py).
        datadir.make_dir(self.data_dir)
        self.domains_dir.mkdir(exist_ok=True, mode=datadir.DIR_MODE)
        datadir.private_store(self.data_dir)
        self.generation = _Generation(self.data_dir / "users.sqlite-gen", like=self.path,
                                      opener=opener)
        self._db().executescript(SCHEMA)

    # -- connections: one per thread (the reactor thread and the pool's threads) --------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                 isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._local.db = _Tx(db, self.generation, self.clock)
            db = self._local.db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None
        self.generation.close()

    # -- paths -------------------------------------------------------------------------------
    # -- domains -----------------------------------------------------------------------------
    def add_domain(self, name: str, postmaster: str | None = None) -> str:
        domain = normalize_domain(name)
        pm_local = None
        if postmaster is not None:
            pm = postmaster if "@" in postmaster else f"{postmaster}@{domain}"
            pm_local = _check_target(pm)
        with self._db() as db:
            if db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise StoreError(f"domain {domain} already exists")
            db.execute("INSERT INTO domains(name, postmaster, created) VALUES (?,?,?)",
                       (domain, pm_local, self.wallclock()))
            if pm_local is not None:
                self._set_role_aliases(db, domain, pm_local)
        (self.domains_dir / domain).mkdir(exist_ok=True, mode=0o700)
        return domain

    def _set_role_aliases(self, db, domain: str, target: str) -> None:
        for role in ROLE_ALIASES:
            # A role name that is a real mailbox keeps its mail: no alias shadows a user.
            if db.execute("SELECT 1 FROM users WHERE domain=? AND local=?",
                          (domain, role)).fetchone():
                continue
            db.execute("INSERT OR IGNORE INTO aliases(domain, local, targets) VALUES (?,?,?)",
                       (domain, role, json.dumps([target])))

    def del_domain(self, name: str, force: bool = False) -> int:
        """Delete a domain, its users, aliases and mailboxes; -> messages removed. Refused
        while its mailboxes hold mail, unless `force` (vpopmail's vdeldomain never asked)."""
        domain = normalize_domain(name)
        if not self.has_domain(domain):
            raise StoreError(f"no such domain: {domain}")
        stored = _count_mail(self.domains_dir / domain)
        if stored and not force:
            raise StoreError(f"domain {domain} has {stored} message{'s' * (stored != 1)} in "
                             f"its mailboxes; `domain del {domain} --force` deletes "
                             f"{'them' if stored != 1 else 'it'} too")
        with self._db() as db:
            cur = db.execute("DELETE FROM domains WHERE name=?", (domain,))
            if cur.rowcount == 0:
                raise StoreError(f"no such domain: {domain}")
            db.execute("DELETE FROM users WHERE domain=?", (domain,))
            db.execute("DELETE FROM aliases WHERE domain=?", (domain,))
        path = self.domains_dir / domain
        if not force and _count_mail(path):
            # Delivered between the count and the delete: the domain is gone (new mail for it
            # bounces), its mail stays on disk for the operator rather than being lost.
            raise StoreError(f"domain {domain} deleted, but mail arrived meanwhile: its "
                             f"mailboxes stay in {path}")
        # The directory name is a validated label: nothing outside domains/ is touched.
        shutil.rmtree(path, ignore_errors=True)
        return stored

    def list_domains(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT name FROM domains ORDER BY name")]

    def has_domain(self, name: str) -> bool:
        db = self._db()

        def lookup() -> bool:
            try:
                domain = normalize_domain(name)
            except StoreError:
                return False
            return db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone() \
                is not None
        return db.cached(("d", name), lookup)

    # -- users -------------------------------------------------------------------------------
    def add_user(self, address: str, password: str | None, quota: int = 0, *,
                 password_hash: str | None = None) -> User:
        """Add a user with `password` (policy checked, bcrypt-hashed), or with a
        `password_hash` kept as it is (the importer: a vpopmail crypt(3) hash, or a disabled
        one; passwords.py says which kinds verify)."""
        local, domain = split_address(address)
        if local in ROLE_ALIASES:
            # A role name may still be a real mailbox: the alias then points at it.
            pass
        if password_hash is None:
            why = passwords.check_policy(password)
            if why:
                raise StoreError(why)
        elif not password_hash or password is not None:
            raise StoreError("give a password or a non-empty password hash, not both")
        if not isinstance(quota, int) or quota < 0:
            raise StoreError("quota must be a number of bytes, 0 for none")
        hashed = password_hash or passwords.hash_password(password, self.bcrypt_cost)
        maildir = self.maildir_for(local, domain)
        with self._db() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise StoreError(f"no such domain: {domain}")
            if db.execute("SELECT 1 FROM users WHERE domain=? AND local=?",
                          (domain, local)).fetchone():
                raise StoreError(f"user {local}@{domain} already exists")
            # One address, one meaning: a user would silently win over the alias in delivery
            # while sender binding still honoured the alias.
            alias = db.execute("SELECT targets FROM aliases WHERE domain=? AND local=?",
                               (domain, local)).fetchone()
            if alias:
                raise StoreError(f"{local}@{domain} is an alias (-> "
                                 f"{' '.join(json.loads(alias[0]))}); delete it first with "
                                 f"`alias del {local}@{domain}`")
            db.execute("INSERT INTO users(domain, local, password_hash, quota, created) "
                       "VALUES (?,?,?,?,?)", (domain, local, hashed, quota, self.wallclock()))
            # The first user of a domain without a named postmaster receives the role aliases.
            pm = db.execute("SELECT postmaster FROM domains WHERE name=?", (domain,)).fetchone()[0]
            if pm is None:
                target = f"{local}@{domain}"
                db.execute("UPDATE domains SET postmaster=? WHERE name=?", (target, domain))
                self._set_role_aliases(db, domain, target)
            self._make_maildir(maildir)
        return User(local, domain, quota, maildir, hashed)

    def del_user(self, address: str) -> None:
        local, domain = split_address(address)
        with self._db() as db:
            cur = db.execute("DELETE FROM users WHERE domain=? AND local=?", (domain, local))
            if cur.rowcount == 0:
                raise StoreError(f"no such user: {local}@{domain}")
        shutil.rmtree(self.domains_dir / domain / local, ignore_errors=True)

    def set_password(self, address: str, password: str) -> None:
        local, domain = split_address(address)
        why = passwords.check_policy(password)
        if why:
            raise StoreError(why)
        hashed = passwords.hash_password(password, self.bcrypt_cost)
        with self._db() as db:
            cur = db.execute("UPDATE users SET password_hash=? WHERE domain=? AND local=?",
                             (hashed, domain, local))
            if cur.rowcount == 0:
                raise StoreError(f"no such user: {local}@{domain}")

    def set_quota(self, address: str, quota: int) -> None:
        local, domain = split_address(address)
        if not isinstance(quota, int) or quota < 0:
            raise StoreError("quota must be a number of bytes, 0 for none")
        with self._db() as db:
            cur = db.execute("UPDATE users SET quota=? WHERE domain=? AND local=?",
                             (quota, domain, local))
            if cur.rowcount == 0:
                raise StoreError(f"no such user: {local}@{domain}")

    def _user(self, row) -> User:
        domain, local, hashed, quota = row
        return User(local, domain, quota, self.maildir_for(local, domain), hashed)

    def get_user(self, address: str) -> User | None:
        try:
            local, domain = split_address(address)
        except StoreError:
            return None
        db = self._db()

        def lookup() -> User | None:     # local delivery asks for every message: see _Tx
            row = db.execute("SELECT domain, local, password_hash, quota FROM users "
                             "WHERE domain=? AND local=?", (domain, local)).fetchone()
            return self._user(row) if row else None
        return db.cached(("u", local, domain), lookup)

    def list_users(self, domain: str | None = None) -> list[User]:
        if domain is None:
            rows = self._db().execute("SELECT domain, local, password_hash, quota FROM users "
                                      "ORDER BY domain, local")
        else:
            d = normalize_domain(domain)
            if not self.has_domain(d):
                raise StoreError(f"no such domain: {d}")
            rows = self._db().execute("SELECT domain, local, password_hash, quota FROM users "
                                      "WHERE domain=? ORDER BY local", (d,))
        return [self._user(r) for r in rows]

    # -- aliases -----------------------------------------------------------------------------
    def add_alias(self, address: str, targets: list[str]) -> None:
        local, domain = split_address(address)
        if not targets:
            raise StoreError("an alias needs at least one target")
        if len(targets) > MAX_ALIAS_TARGETS:
            raise StoreError(f"an alias may have at most {MAX_ALIAS_TARGETS} targets")
        clean = [_check_target(t) for t in targets]
        if f"{local}@{domain}" in clean:
            raise StoreError("an alias cannot point to itself")
        with self._db() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise StoreError(f"no such domain: {domain}")
            if db.execute("SELECT 1 FROM users WHERE domain=? AND local=?",
                          (domain, local)).fetchone():
                raise StoreError(f"{local}@{domain} is a user; an alias of the same address "
                                 "would never be used (delete the user first)")
            db.execute("INSERT INTO aliases(domain, local, targets) VALUES (?,?,?) "
                       "ON CONFLICT(domain, local) DO UPDATE SET targets=excluded.targets",
                       (domain, local, json.dumps(clean)))

    def del_alias(self, address: str) -> None:
        local, domain = split_address(address)
        with self._db() as db:
            cur = db.execute("DELETE FROM aliases WHERE domain=? AND local=?", (domain, local))
            if cur.rowcount == 0:
                raise StoreError(f"no such alias: {local}@{domain}")

    def get_alias(self, address: str) -> list[str] | None:
        try:
            local, domain = split_address(address)
        except StoreError:
            return None
        db = self._db()

        def lookup() -> tuple[str, ...] | None:
            # An alias shadowed by a user (made before collisions were refused) is not used:
            # the user gets the mail, and nobody may send as the user through the alias.
            row = db.execute("SELECT targets FROM aliases a WHERE domain=? AND local=? AND "
                             "NOT EXISTS (SELECT 1 FROM users u WHERE u.domain=a.domain AND "
                             "u.local=a.local)", (domain, local)).fetchone()
            return tuple(json.loads(row[0])) if row else None
        hit = db.cached(("a", local, domain), lookup)
        return list(hit) if hit is not None else None     # a copy: callers may change it

    def list_aliases(self) -> list[tuple[str, list[str]]]:
        rows = self._db().execute("SELECT local, domain, targets FROM aliases "
                                  "ORDER BY domain, local")
        return [(f"{lo}@{d}", json.loads(t)) for lo, d, t in rows]

    def shadowed_aliases(self) -> set[str]:
        """Aliases that are also users (made before add_user and add_alias refused that):
        never used; `alias list` marks them and `mailappliance check` reports them."""
        rows = self._db().execute("SELECT a.local, a.domain FROM aliases a JOIN users u "
                                  "ON u.domain=a.domain AND u.local=a.local")
        return {f"{lo}@{d}" for lo, d in rows}

    # -- lookups for SMTP, delivery and POP3 --------------------------------------------------
    def lookup_recipient(self, address: str) -> str:
        """"user", "alias", "unknown" (our domain, no such name) or "remote" (not our domain)."""
        if not isinstance(address, str) or "@" not in address:
            return "unknown"
        db = self._db()
        return db.cached(("r", address), lambda: self._lookup_recipient(db, address))

    @staticmethod
    def _lookup_recipient(db: "_Tx", address: str) -> str:
        local_raw, domain_raw = address.rsplit("@", 1)
        try:
            domain = normalize_domain(domain_raw)
        except StoreError:
            return "remote"
        if not db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
            return "remote"
        try:
            local = normalize_local(local_raw)
        except StoreError:
            return "unknown"
        if db.execute("SELECT 1 FROM users WHERE domain=? AND local=?", (domain, local)).fetchone():
            return "user"
        row = db.execute("SELECT targets FROM aliases WHERE domain=? AND local=?",
                         (domain, local)).fetchone()
        if row and json.loads(row[0]):
            return "alias"
        return "unknown"

    def check_password(self, address: str, password: str) -> User | None:
        """Blocking bcrypt check. Unknown users cost one bcrypt too, so timing reveals nothing."""
        user = self.get_user(address)
        return passwords.login(user, password, self.bcrypt_cost, self._rehash)

    def _rehash(self, user: User, password: str) -> User:
        """Replace an imported crypt(3) hash with bcrypt after a login proved the password.
        Only if the hash is still the one just verified (a `user passwd` in between wins);
        a failure leaves the old hash, and the next login tries again."""
        hashed = passwords.hash_password(password, self.bcrypt_cost)
        try:
            with self._db() as db:
                cur = db.execute("UPDATE users SET password_hash=? WHERE domain=? AND local=? "
                                 "AND password_hash=?",
                                 (hashed, user.domain, user.local, user.password_hash))
                if cur.rowcount != 1:
                    return user
        except sqlite3.Error:
            return user
        return User(user.local, user.domain, user.quota, user.maildir, hashed)


def alias_line(address: str, targets, shadowed) -> str:
    """One line of `alias list` (the command and the admin protocol); an alias that is also a
    user (UserStore.shadowed_aliases) is marked as unused."""
    line = f"{address} -> {' '.join(targets)}"
    if address in shadowed:
        line += f" (unused: {address} is a user, which gets its mail; `alias del {address}`)"
    return line


# Entries counted at most when counting a domain's mail: far above any small host's mailboxes;
# it keeps `domain del` from walking a huge tree for minutes (any count refuses without --force).
MAX_COUNT_ENTRIES = 10_000_000


def _count_mail(domain_dir: Path) -> int:
    """Files in <domain>/<user>/Maildir/{new,cur}."""
    n = 0
    try:
        users = list(os.scandir(domain_dir))
    except OSError:
        return 0
    for user in users:
        for sub in ("new", "cur"):
            try:
                with os.scandir(os.path.join(user.path, "Maildir", sub)) as it:
                    for entry in it:
                        if not entry.name.startswith("."):
                            n += 1
                            if n >= MAX_COUNT_ENTRIES:
                                return n
            except OSError:
                continue
    return n


class _Generation:
    """A token that changes whenever anyone commits a change to the user store.

    The recipient lookups that SMTP runs on the reactor thread for every RCPT are cached; this
    token says when the cache is stale. It is 8 bytes in ``users.sqlite-gen``, mapped into memory, so
    reading it costs no system call and no round trip through SQLite (a call into SQLite from
    the reactor thread releases the GIL and, under load, waits to get it back from the pool's
    threads: that wait was a tenth of the reactor's time per message). Every writer -- this
    process, the CLI, another server process on the same data directory -- stores a fresh
    random token after its COMMIT, so a reader that read the token before its queries can only
    see the same token again if nothing committed since. A process-local counter covers writes
    through another connection of this process even when the file cannot be written.
    """

    SIZE = 8

    def __init__(self, path: Path, like: Path, opener: Callable[..., int] = os.open) -> None:
        self.local = 0
        self._map: mmap.mmap | None = None
        self._writable = False
        try:
            fd = opener(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o660)
            self._writable = True
        except PermissionError:
            try:
                fd = opener(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                return
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if self._writable and st.st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)
                self._same_owner(fd, like)
            if os.fstat(fd).st_size >= self.SIZE:
                self._map = mmap.mmap(fd, self.SIZE, mmap.MAP_SHARED,
                                      mmap.PROT_READ | (mmap.PROT_WRITE if self._writable else 0))
        except OSError:
            self._map = None
        finally:
            os.close(fd)

    @staticmethod
    def _same_owner(fd: int, like: Path) -> None:
        """Run as root (the CLI), give the new file the owner of users.sqlite, like SQLite's."""
        if os.geteuid() != 0:
            return
        try:
            st = os.stat(like)
            os.fchown(fd, st.st_uid, st.st_gid)
        except OSError:
            pass

    def current(self) -> tuple:
        m = self._map
        return (m[:8] if m is not None else b"", self.local)

    def bump(self) -> None:
        self.local += 1
        if self._map is not None and self._writable:
            try:
                self._map[:8] = secrets.token_bytes(8)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except (OSError, ValueError):
                pass
            self._map = None


class _Tx:
    """A connection whose `with` block is one IMMEDIATE transaction (writers serialise early).

    It also keeps this connection's cache of recipient and domain lookups, which SMTP asks for
    on the reactor thread for every RCPT and the queue for every recipient. The cache is valid
    while the store's generation token (see `_Generation`) is unchanged; every write through a
    UserStore changes it after its COMMIT, so a user added or removed with the CLI counts from
    the next lookup on, exactly as without the cache. As a safety net for programs that write
    users.sqlite without mailappliance, SQLite's ``PRAGMA data_version`` is also compared at
    least every `RECHECK_SECONDS`.
    """

    MAX_CACHED = 10_000
    RECHECK_SECONDS = 2.0

    def __init__(self, conn: sqlite3.Connection, generation: _Generation,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.conn = conn
        self.generation = generation
        self.clock = clock
        self._cache: dict = {}
        self._token: tuple | None = None
        self._data_version = None
        self._checked = 0.0

    def cache(self) -> dict:
        token = self.generation.current()
        now = self.clock()
        if now - self._checked >= self.RECHECK_SECONDS:
            self._checked = now
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._data_version = version
                self._token = None
        if token != self._token or self.conn.in_transaction:
            self._cache.clear()
            self._token = token
        return self._cache

    def cached(self, key, lookup):
        """The cached answer for `key`, else `lookup()`'s, remembered."""
        cache = self.cache()
        hit = cache.get(key, _MISS)
        if hit is _MISS:
            hit = lookup()
            self.remember(key, hit)
        return hit

    def remember(self, key, value) -> None:
        if self.conn.in_transaction:
            return
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[key] = value

    def _changed(self) -> None:
        self._cache.clear()
        self.generation.bump()

    def execute(self, sql, *args):
        if sql.startswith(("SELECT", "PRAGMA")):
            return self.conn.execute(sql, *args)
        self._cache.clear()
        try:
            return self.conn.execute(sql, *args)
        finally:
            if not self.conn.in_transaction:
                self._changed()

    def executescript(self, script: str):
        self._cache.clear()
        try:
            return self.conn.executescript(script)
        finally:
            self._changed()

    def __enter__(self):
        self._cache.clear()
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        self._cache.clear()
        try:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
        finally:
            self._changed()
        return False
