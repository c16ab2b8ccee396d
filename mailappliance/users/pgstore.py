"""The user directory and the roaming grants in PostgreSQL, for several nodes (DESIGN.md 6).

A blocking store like `users/store.py` (no Twisted): the same names, validation, refusals and
Maildir handling, on a database that every node shares. The driver is psycopg 3 with
psycopg_pool: it is libpq, so `[users] database` is any libpq URI and its password may come
from the URI, PGPASSFILE or a service file exactly as psql would find it; its connections are
thread-safe and blocking, which is what a store called from the server's thread pool wants;
and it is maintained by PostgreSQL's own Python driver authors. (asyncpg would need asyncio
in a Twisted reactor and re-implements libpq's connection options; psycopg2 is in
maintenance only.)

Lookups that SMTP, local delivery and the admin protocol ask again and again (recipient,
domain, user, alias, grant) are cached per process. The cache is invalidated through the
database: triggers NOTIFY channel `mailappliance` after each committed change
(`pgschema.py`), and one watcher thread per process LISTENs. The watcher also runs a probe
query every `PROBE_SECONDS`; the cache answers only while the last probe that went through
was sent less than `MAX_STALE_SECONDS` ago. So a change made on any node counts here after
the NOTIFY's delivery (milliseconds, see benchmarks/), and never later than
`MAX_STALE_SECONDS` even if the watcher's connection dies silently: past that, every lookup
asks the database, and a database that does not answer makes the lookup raise
`DirectoryUnavailable` (451 at RCPT), never a stale accept. A reconnected watcher empties
the cache (notifications sent while it was away are lost), and a lookup that raced with a
change never stores its answer (an epoch check), so a cached answer is never older than a
change whose notification was handled.

Password checks (POP3, SMTP AUTH) never use the cache: a password changed on one node is
refused on every node at its next login.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout
from zope.interface import implementer

from mailappliance.access.relay import MAX_GRANTS, normalize_ip
from mailappliance.users import passwords, pgschema
from mailappliance.users.directory import (
    MISS,
    DirectoryUnavailable,
    IRemoteDirectory,
    IRemoteGrants,
)
from mailappliance.users.store import (
    MAX_ALIAS_TARGETS,
    ROLE_ALIASES,
    MailboxTree,
    StoreError,
    User,
    _check_target,
    _count_mail,
    normalize_domain,
    normalize_local,
    split_address,
)

# psycopg_pool logs each failed connection attempt (several lines, libpq's hint included) to
# the stdlib logger "psycopg.pool"; with no handler configured Python would print them to
# stderr, in the middle of `check`'s one line per problem and the server's log. The store
# reports what counts itself (DirectoryUnavailable, on_event "lost"/"reconnected"); an
# application that configures logging still receives the records (propagation is left on).
logging.getLogger("psycopg").addHandler(logging.NullHandler())

# --- limits, each with its reason ----------------------------------------------------------------
# Connections per node. A cache miss holds one for a single round trip (tens to hundreds of
# microseconds), so four serve thousands of lookups a second; a 4-node site then uses 16 plus
# 4 watchers of PostgreSQL's default max_connections of 100.
POOL_MAX = 4
# A lookup waits this long for a pooled connection before it is answered with a temporary
# failure: long enough for a database restart's first reconnect, short against SMTP's
# 5-minute RCPT timeout (RFC 5321 4.5.3.2.3), and it bounds the thread it holds.
POOL_TIMEOUT = 3.0
# libpq defaults the product adds when the URI does not set them: a connect attempt gives up
# after CONNECT_TIMEOUT (libpq's minimum that counts is 2 s); a peer that stops acknowledging
# (a cut network, a powered-off host) breaks the connection after TCP_USER_TIMEOUT_MS instead
# of the kernel's ~15 minutes of retransmissions; keepalives find a dead idle connection.
CONNECT_TIMEOUT = 3
TCP_USER_TIMEOUT_MS = 5000
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 2}
# Server side: no statement of ours may run longer (the slowest, `expire` on 100,000 grants,
# takes milliseconds); a stuck one is cancelled and reported as unavailable.
STATEMENT_TIMEOUT_MS = 5000
# The watcher's probe interval and the age past which the cache is not trusted. DESIGN.md
# promises that a change is seen everywhere within 2 seconds; the bound here is 1 s, leaving
# the rest for a lookup that then has to ask the database.
PROBE_SECONDS = 0.25
MAX_STALE_SECONDS = 1.0
# After a failure, calls fail at once for this long instead of each waiting POOL_TIMEOUT on a
# database that is down (a circuit breaker); then one call tries again.
BREAKER_SECONDS = 1.0
# The watcher's reconnect back-off after a failure: first and largest wait.
RECONNECT_FIRST, RECONNECT_MAX = 0.2, 5.0
# Entries per cache; past it the cache starts over (as SQLite's _Tx.MAX_CACHED).
MAX_CACHED = 10_000
# A write transaction that PostgreSQL rolls back for a deadlock or a serialization failure
# (two nodes, or the server and the CLI, writing at once) is run again this many times in all:
# the usual answer to those errors, and the retried work is a few rows.
WRITE_ATTEMPTS = 3
# Writes that depend on what else a domain holds (a user, an alias of the same address, the
# first user becoming postmaster) take the domain's row for update first, so two of them on one
# domain run one after the other: with FOR SHARE both held the row and both then upgraded it
# (a deadlock), and each could miss the other's new address (a user and an alias of one
# address). FOR NO KEY UPDATE leaves the users' and aliases' foreign-key checks unblocked.
_LOCK_DOMAIN = "SELECT 1 FROM domains WHERE name=%s FOR NO KEY UPDATE"
# SQLSTATE class 40 (psycopg does not make the specific ones subclasses of TransactionRollback).
_ROLLED_BACK = (psycopg.errors.TransactionRollback, psycopg.errors.SerializationFailure,
                psycopg.errors.DeadlockDetected)


def describe(database: str) -> str:
    """The URI without its password (for `stat`, `check` and logs)."""
    try:
        params = conninfo_to_dict(database)
    except psycopg.Error:
        return "postgresql://(unparsable URI)"
    user = params.get("user")
    host = str(params.get("host") or "")
    port = params.get("port")
    where = host if not host.startswith("/") else ""
    text = "postgresql://" + (f"{user}@" if user else "") + where
    if port:
        text += f":{port}"
    text += "/" + str(params.get("dbname") or "")
    if host.startswith("/"):
        text += f"?host={host}"
    return text


def connection_info(database: str) -> str:
    """The URI with the product's timeouts and keepalives added where it sets none."""
    try:
        params = conninfo_to_dict(database)
    except psycopg.Error as e:
        raise StoreError(f"[users] database: not a libpq URI: {_one_line(e)}") from None
    extra: dict = {"application_name": "mailappliance", "connect_timeout": CONNECT_TIMEOUT,
                   "tcp_user_timeout": TCP_USER_TIMEOUT_MS, **KEEPALIVES}
    return make_conninfo(database, **{k: v for k, v in extra.items() if k not in params})


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class _Cache:
    """Answers remembered until the watcher says they may be stale.

    `get` answers only while the watcher is fresh. A lookup reads `epoch()` before its query
    and `put`s with it; an invalidation in between bumps the epoch, and the answer (possibly
    read before the change committed) is dropped instead of stored.
    """

    def __init__(self, fresh: Callable[[], bool]) -> None:
        self._fresh = fresh
        self._data: dict = {}
        self._epoch = 0
        self._lock = threading.Lock()

    def get(self, key):
        if not self._fresh():
            return MISS
        return self._data.get(key, MISS)

    def epoch(self) -> int:
        return self._epoch

    def put(self, key, value, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                return
            if len(self._data) >= MAX_CACHED:
                self._data.clear()
            self._data[key] = value

    def invalidate(self, key=None) -> None:
        with self._lock:
            self._epoch += 1
            if key is None:
                self._data.clear()
            else:
                self._data.pop(key, None)


class _Watcher:
    """One thread per process: LISTENs for changes and probes that the database answers."""

    def __init__(self, db: "PgDatabase") -> None:
        self._db = db
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.connected = threading.Event()
        self.confirmed = float("-inf")        # monotonic time the last good probe was sent
        self.stop_token = "stop " + secrets.token_hex(8)
        self._barriers: dict[str, threading.Event] = {}
        self.reconnects = 0
        self.last_error = ""

    def ensure_started(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                t = threading.Thread(target=self._run, name="mailappliance-pg-watcher",
                                     daemon=True)
                t.start()
                self._thread = t

    def fresh(self) -> bool:
        if self._thread is None:
            self.ensure_started()
            return False
        return self._db.monotonic() - self.confirmed <= MAX_STALE_SECONDS

    def barrier(self) -> tuple[str, threading.Event]:
        token = "sync " + secrets.token_hex(8)
        event = self._barriers[token] = threading.Event()
        return token, event

    def forget(self, token: str) -> None:
        self._barriers.pop(token, None)

    def _dispatch(self, payload: str) -> None:
        db = self._db
        if payload == "directory":
            db.directory_cache.invalidate()
        elif payload.startswith("grant "):
            db.grants_cache.invalidate(("g", payload[6:]))
        elif payload == "grants":
            db.grants_cache.invalidate()
        elif payload.startswith("sync "):
            event = self._barriers.pop(payload, None)
            if event is not None:
                event.set()
        elif payload == self.stop_token:
            self._stop.set()
        else:       # a payload of a newer version: safest is to forget everything
            db.invalidate_all()

    def _run(self) -> None:
        delay = RECONNECT_FIRST
        db = self._db
        while not self._stop.is_set():
            try:
                with psycopg.connect(db.conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {pgschema.CHANNEL}")
                    # Whatever was cached before this LISTEN may have missed a notification.
                    db.invalidate_all()
                    # A sync() waiting since before now is served by that: its barrier may
                    # have been sent to the connection that died.
                    for event in list(self._barriers.values()):
                        event.set()
                    if self.reconnects:
                        db.event("reconnected", "")
                    self.connected.set()
                    self.last_error = ""
                    delay = RECONNECT_FIRST
                    while not self._stop.is_set():
                        sent = db.monotonic()
                        conn.execute("SELECT 1")
                        for n in conn.notifies(timeout=0):       # those that came with it
                            self._dispatch(n.payload)
                        self.confirmed = sent
                        for n in conn.notifies(timeout=db.probe_seconds):
                            self._dispatch(n.payload)
                            if self._stop.is_set():
                                break
            except psycopg.Error as e:
                self.confirmed = float("-inf")
                self.connected.clear()
                self.reconnects += 1
                self.last_error = _one_line(e)
                db.event("lost", self.last_error)
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX)
        self.connected.clear()

    def stop(self) -> None:
        thread = self._thread
        self._stop.set()
        if thread is not None:
            thread.join(self._db.probe_seconds + CONNECT_TIMEOUT + 1)


class PgDatabase:
    """The pool, the watcher and the two caches: shared by a PgUserStore and PgRelayGrants."""

    def __init__(self, database: str, *, pool_max: int = POOL_MAX,
                 monotonic: Callable[[], float] = time.monotonic,
                 on_event: Callable[[str, str], None] | None = None,
                 migrations=pgschema.MIGRATIONS, probe_seconds: float = PROBE_SECONDS,
                 start: bool = True) -> None:
        """`start=False`: no thread yet (the pool opens and the watcher starts at `start()`
        or at the first lookup): the server opens the database before twistd forks, and a
        fork keeps no threads."""
        self.database = database
        self.probe_seconds = probe_seconds
        self.description = describe(database)
        self.conninfo = connection_info(database)
        self.monotonic = monotonic
        self._on_event = on_event           # ("lost", why) / ("reconnected", "")
        self._migrations = migrations
        self._broken_until = float("-inf")
        self.watcher = _Watcher(self)
        self.directory_cache = _Cache(self.watcher.fresh)
        self.grants_cache = _Cache(self.watcher.fresh)
        self.pool = ConnectionPool(
            self.conninfo, min_size=1, max_size=pool_max, open=False, timeout=POOL_TIMEOUT,
            kwargs={"autocommit": True}, configure=self._configure,
            name="mailappliance", reconnect_timeout=60.0)
        self._started = False
        self._start_lock = threading.Lock()
        if start:
            self.start()

    def start(self) -> None:
        """Open the pool and start the watcher (idempotent, thread-safe)."""
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                self.pool.open(wait=False)
                self._started = True
        self.watcher.ensure_started()

    @property
    def locks(self) -> "PgMailboxLocks":
        """POP3's cross-node mailbox locks (one dedicated connection, opened at first use)."""
        locks = self.__dict__.get("mailbox_locks")
        if locks is None:
            with self._start_lock:
                locks = self.__dict__.setdefault("mailbox_locks", PgMailboxLocks(self))
        return locks

    def _configure(self, conn) -> None:
        conn.execute(f"SET search_path TO {pgschema.SCHEMA}")
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")

    def event(self, what: str, why: str) -> None:
        if self._on_event is not None:
            try:
                self._on_event(what, why)
            except Exception:  # noqa: BLE001 - a logging hook must not stop the watcher
                pass

    def ensure_schema(self) -> tuple[int, int]:
        """Create or upgrade the schema; (version found, version now). Raises SchemaError or
        DirectoryUnavailable."""
        # Its own connection, not the pool's: a refused password or an unknown database is
        # reported as the server said it, where the pool would only time out.
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                return pgschema.migrate(conn, self._migrations)
        except psycopg.OperationalError as e:
            raise DirectoryUnavailable(f"database {self.description}: {_one_line(e)}") from None

    @contextmanager
    def connection(self):
        """A pooled connection (autocommit, search_path set); DirectoryUnavailable if none."""
        if not self._started:
            self.start()
        if self.monotonic() < self._broken_until:
            raise DirectoryUnavailable(f"database {self.description} unreachable "
                                       "(failed less than a second ago)")
        try:
            with self.pool.connection() as conn:
                yield conn
        except PoolTimeout:
            self._broken_until = self.monotonic() + BREAKER_SECONDS
            last = self.watcher.last_error
            raise DirectoryUnavailable(f"database {self.description}: no connection within "
                                       f"{POOL_TIMEOUT:g} s" + (f" ({last})" if last else "")
                                       ) from None
        except _ROLLED_BACK as e:
            # A deadlock or a serialization failure says nothing about the database's health.
            raise DirectoryUnavailable(f"database {self.description}: {_one_line(e)}") from None
        except psycopg.OperationalError as e:
            self._broken_until = self.monotonic() + BREAKER_SECONDS
            raise DirectoryUnavailable(f"database {self.description}: {_one_line(e)}") from None

    def read(self, query: Callable):
        """Run a read-only `query(conn)`. A connection broken by a database restart is
        replaced once; the pool may hold several, so each is tried at most once."""
        for attempt in range(POOL_MAX + 1):
            try:
                with self.connection() as conn:
                    try:
                        return query(conn)
                    except psycopg.OperationalError:
                        if conn.broken and attempt < POOL_MAX:
                            raise _Retry() from None
                        raise
            except _Retry:
                self._broken_until = float("-inf")
                continue
        raise AssertionError("unreachable")

    def cached(self, cache: _Cache, key, query: Callable):
        hit = cache.get(key)
        if hit is not MISS:
            return hit
        epoch = cache.epoch()
        value = self.read(query)
        cache.put(key, value, epoch)
        return value

    def invalidate_all(self) -> None:
        self.directory_cache.invalidate()
        self.grants_cache.invalidate()

    def sync(self, timeout: float = 5.0) -> float:
        """Block until the watcher has handled every change committed before this call;
        returns the seconds it took. Raises DirectoryUnavailable when it cannot."""
        start = self.monotonic()
        watcher = self.watcher
        watcher.ensure_started()
        if not watcher.connected.wait(timeout):
            raise DirectoryUnavailable(f"database {self.description}: watcher not connected")
        token, event = watcher.barrier()
        try:
            self.read(lambda conn: conn.execute("SELECT pg_notify(%s, %s)",
                                                (pgschema.CHANNEL, token)))
            if not event.wait(max(0.0, timeout - (self.monotonic() - start))):
                raise DirectoryUnavailable(f"database {self.description}: no notification "
                                           f"within {timeout:g} s")
        finally:
            watcher.forget(token)
        return self.monotonic() - start

    def close(self) -> None:
        watcher = self.watcher
        if watcher._thread is not None and watcher.connected.is_set():
            try:        # wake the watcher now rather than at its next probe
                with self.pool.connection(timeout=1.0) as conn:
                    conn.execute("SELECT pg_notify(%s, %s)",
                                 (pgschema.CHANNEL, watcher.stop_token))
            except (psycopg.Error, PoolTimeout):
                pass
        watcher.stop()
        locks = self.__dict__.get("mailbox_locks")
        if locks is not None:
            locks.close()
        self.pool.close()


class _Retry(Exception):
    pass


# --- POP3's one-session lock across nodes --------------------------------------------------------

def _lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for a mailbox (collisions: 2**-64 per pair)."""
    return int.from_bytes(hashlib.sha256(b"mailappliance pop3 " + name.encode("utf-8"))
                          .digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class LockToken:
    key: int
    generation: int          # the lock connection it was taken on


class PgMailboxLocks:
    """Session-level advisory locks on one dedicated connection per node: POP3's one session
    per mailbox across every node of a site. flock does not hold across NFS clients (Linux
    emulates it with byte-range locks, which a directory cannot carry); these are released
    by PostgreSQL when the node's connection ends, so a node that dies leaves no stale lock.
    Inside a node (one process) a table of the keys this node holds excludes a second session:
    an advisory lock is re-entrant for its own database session, and the Maildir's flock
    cannot be relied on over NFS (with the default `local_lock=none` Linux sends it to the
    server as a byte-range lock, which NFSv4 does not grant on a directory).

    A lock connection that broke took its locks with it: `held()` says so, and POP3 then
    refuses the session's UPDATE (-ERR [SYS/TEMP]) instead of deleting without the lock.
    try_lock and held are blocking (a thread); unlock never blocks its caller (the reactor
    releases a lock at connectionLost): it is queued to this object's own thread.
    """

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._conn = None
        self._generation = 0
        self._mutex = threading.Lock()           # one statement at a time on the connection
        # The queue and the thread have their own small lock: unlock() must never wait
        # behind a try_lock that waits on the network.
        self._list_lock = threading.Lock()
        self._pending: list[LockToken] = []      # unlocks queued by non-blocking callers
        self._held: dict[int, LockToken] = {}    # key -> token: this node's sessions (_list_lock)
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def _connection(self):
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass
        self._conn = None
        try:
            conn = psycopg.connect(self._db.conninfo, autocommit=True)
        except psycopg.OperationalError as e:
            raise DirectoryUnavailable(f"database {self._db.description}: {_one_line(e)}") \
                from None
        self._generation += 1                    # locks of an earlier connection are gone
        self._conn = conn
        return conn

    def _run(self, sql: str, key: int):
        conn = self._connection()
        try:
            return conn.execute(sql, (key,)).fetchone()[0]
        except psycopg.OperationalError as e:
            raise DirectoryUnavailable(f"database {self._db.description}: {_one_line(e)}") \
                from None

    def try_lock(self, name: str) -> LockToken | None:
        """The lock of mailbox `name`, or None when another node holds it. Blocking;
        DirectoryUnavailable when the database cannot be reached."""
        key = _lock_key(name)
        with self._mutex:
            self._flush_locked()
            self._connection()       # a broken connection is replaced: a new generation
            with self._list_lock:
                mine = self._held.get(key)
                if mine is not None and mine.generation == self._generation:
                    return None                  # a session of this node has it
            if self._run("SELECT pg_try_advisory_lock(%s)", key):
                token = LockToken(key, self._generation)
                with self._list_lock:
                    self._held[key] = token      # replaces one lost with its connection
                return token
            return None

    def held(self, token: LockToken) -> bool:
        """Blocking: the lock connection that took `token` is still up (so is the lock)."""
        with self._mutex:
            conn = self._conn
            if token.generation != self._generation or conn is None or conn.broken:
                return False
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                return False
            return True

    def unlock(self, token: LockToken) -> None:
        """Release, without blocking: queued to the lock thread."""
        with self._list_lock:
            if self._held.get(token.key) == token:
                del self._held[token.key]
            if self._closed:
                return
            self._pending.append(token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._unlocker, daemon=True,
                                                name="mailappliance-pg-locks")
                self._thread.start()
        self._wake.set()

    def _take_pending(self) -> list[LockToken]:
        with self._list_lock:
            pending, self._pending = self._pending, []
            self._wake.clear()
        return pending

    def _flush_locked(self) -> None:
        for token in self._take_pending():
            if token.generation != self._generation:
                continue                         # its connection is gone, and the lock too
            try:
                self._run("SELECT pg_advisory_unlock(%s)", token.key)
            except DirectoryUnavailable:
                pass                             # the connection broke: the lock went with it

    def _unlocker(self) -> None:
        while not self._closed:
            self._wake.wait()
            with self._mutex:
                self._flush_locked()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._mutex:
            if self._conn is not None:
                self._conn.close()          # ends the session: every lock it held is released
                self._conn = None


@implementer(IRemoteDirectory)
class PgUserStore(MailboxTree):
    """IUserDirectory on PostgreSQL; Maildirs under `mailboxes` (a tree shared by the nodes)."""

    def __init__(self, database: str | PgDatabase, mailboxes: Path | str,
                 bcrypt_cost: int = passwords.DEFAULT_COST, *, migrate: bool = True,
                 on_event: Callable[[str, str], None] | None = None,
                 start: bool = True) -> None:
        self.db = database if isinstance(database, PgDatabase) \
            else PgDatabase(database, on_event=on_event, start=start)
        self._owns_db = not isinstance(database, PgDatabase)
        self.description = self.db.description
        self.bcrypt_cost = bcrypt_cost
        self.domains_dir = Path(mailboxes)
        try:
            self.domains_dir.mkdir(parents=True, exist_ok=True)
            if migrate:
                self.db.ensure_schema()
        except BaseException:
            if self._owns_db:
                self.db.close()
            raise

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _write(self, fn: Callable):
        """`fn(conn)` in one transaction; this process's caches forget at once after it."""
        try:
            with self.db.connection() as conn:
                for attempt in range(1, WRITE_ATTEMPTS + 1):
                    try:
                        with conn.transaction():
                            return fn(conn)
                    except _ROLLED_BACK:
                        if attempt == WRITE_ATTEMPTS:
                            raise
        finally:
            self.db.directory_cache.invalidate()

    def _cached(self, key, query: Callable):
        return self.db.cached(self.db.directory_cache, key, query)

    def sync(self, timeout: float = 5.0) -> float:
        return self.db.sync(timeout)

    @property
    def mailbox_locks(self) -> PgMailboxLocks:
        """POP3's one-session lock across the nodes (see PgMailboxLocks)."""
        return self.db.locks

    # -- domains -----------------------------------------------------------------------------
    def add_domain(self, name: str, postmaster: str | None = None) -> str:
        domain = normalize_domain(name)
        pm = None
        if postmaster is not None:
            pm = _check_target(postmaster if "@" in postmaster else f"{postmaster}@{domain}")

        def tx(conn):
            row = conn.execute("INSERT INTO domains(name, postmaster) VALUES (%s, %s) "
                               "ON CONFLICT DO NOTHING RETURNING name", (domain, pm)).fetchone()
            if row is None:
                raise StoreError(f"domain {domain} already exists")
            if pm is not None:
                self._set_role_aliases(conn, domain, pm)
        self._write(tx)
        (self.domains_dir / domain).mkdir(exist_ok=True, mode=0o700)
        return domain

    @staticmethod
    def _set_role_aliases(conn, domain: str, target: str) -> None:
        for role in ROLE_ALIASES:
            # A role name that is a real mailbox keeps its mail: no alias shadows a user.
            conn.execute("INSERT INTO aliases(domain, local, targets) SELECT %s, %s, %s "
                         "WHERE NOT EXISTS (SELECT 1 FROM users WHERE domain=%s AND local=%s) "
                         "ON CONFLICT DO NOTHING", (domain, role, [target], domain, role))

    def del_domain(self, name: str, force: bool = False) -> int:
        """As UserStore.del_domain: refused while its mailboxes hold mail, unless `force`."""
        domain = normalize_domain(name)
        if not self.has_domain(domain):
            raise StoreError(f"no such domain: {domain}")
        stored = _count_mail(self.domains_dir / domain)
        if stored and not force:
            raise StoreError(f"domain {domain} has {stored} message{'s' * (stored != 1)} in "
                             f"its mailboxes; `domain del {domain} --force` deletes "
                             f"{'them' if stored != 1 else 'it'} too")

        def tx(conn):       # users and aliases go with it (ON DELETE CASCADE)
            if conn.execute("DELETE FROM domains WHERE name=%s", (domain,)).rowcount == 0:
                raise StoreError(f"no such domain: {domain}")
        self._write(tx)
        path = self.domains_dir / domain
        if not force and _count_mail(path):
            raise StoreError(f"domain {domain} deleted, but mail arrived meanwhile: its "
                             f"mailboxes stay in {path}")
        shutil.rmtree(path, ignore_errors=True)
        return stored

    def list_domains(self) -> list[str]:
        return self.db.read(lambda conn: [r[0] for r in conn.execute(
            'SELECT name FROM domains ORDER BY name COLLATE "C"')])

    def has_domain(self, name: str) -> bool:
        try:
            domain = normalize_domain(name)
        except StoreError:
            return False
        return self._cached(("d", domain), lambda conn: conn.execute(
            "SELECT 1 FROM domains WHERE name=%s", (domain,)).fetchone() is not None)

    def peek_domain(self, name: str):
        try:
            domain = normalize_domain(name)
        except StoreError:
            return False
        return self.db.directory_cache.get(("d", domain))

    # -- users -------------------------------------------------------------------------------
    def add_user(self, address: str, password: str | None, quota: int = 0, *,
                 password_hash: str | None = None) -> User:
        """As UserStore.add_user: a password, or a `password_hash` kept as it is (import)."""
        local, domain = split_address(address)
        if password_hash is None:
            why = passwords.check_policy(password)
            if why:
                raise StoreError(why)
        elif not password_hash or password is not None:
            raise StoreError("give a password or a non-empty password hash, not both")
        if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
            raise StoreError("quota must be a number of bytes, 0 for none")
        hashed = password_hash or passwords.hash_password(password, self.bcrypt_cost)
        maildir = self.maildir_for(local, domain)

        def tx(conn):
            if conn.execute(_LOCK_DOMAIN, (domain,)).fetchone() is None:
                raise StoreError(f"no such domain: {domain}")
            # One address, one meaning (as UserStore).
            alias = conn.execute("SELECT targets FROM aliases WHERE domain=%s AND local=%s",
                                 (domain, local)).fetchone()
            if alias and not conn.execute("SELECT 1 FROM users WHERE domain=%s AND local=%s",
                                          (domain, local)).fetchone():
                raise StoreError(f"{local}@{domain} is an alias (-> {' '.join(alias[0])}); "
                                 f"delete it first with `alias del {local}@{domain}`")
            row = conn.execute("INSERT INTO users(domain, local, password_hash, quota) "
                               "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                               (domain, local, hashed, quota)).fetchone()
            if row is None:
                raise StoreError(f"user {local}@{domain} already exists")
            # The first user of a domain without a named postmaster receives the role aliases.
            target = f"{local}@{domain}"
            if conn.execute("UPDATE domains SET postmaster=%s WHERE name=%s AND postmaster "
                            "IS NULL RETURNING 1", (target, domain)).fetchone():
                self._set_role_aliases(conn, domain, target)
            self._make_maildir(maildir)     # before COMMIT: a failure leaves no user behind
        self._write(tx)
        return User(local, domain, quota, maildir, hashed)

    def del_user(self, address: str) -> None:
        local, domain = split_address(address)

        def tx(conn):
            if conn.execute("DELETE FROM users WHERE domain=%s AND local=%s",
                            (domain, local)).rowcount == 0:
                raise StoreError(f"no such user: {local}@{domain}")
        self._write(tx)
        shutil.rmtree(self.domains_dir / domain / local, ignore_errors=True)

    def set_password(self, address: str, password: str) -> None:
        local, domain = split_address(address)
        why = passwords.check_policy(password)
        if why:
            raise StoreError(why)
        hashed = passwords.hash_password(password, self.bcrypt_cost)
        self._update_user(local, domain, "password_hash", hashed)

    def set_quota(self, address: str, quota: int) -> None:
        local, domain = split_address(address)
        if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
            raise StoreError("quota must be a number of bytes, 0 for none")
        self._update_user(local, domain, "quota", quota)

    def _update_user(self, local: str, domain: str, column: str, value) -> None:
        assert column in ("password_hash", "quota")

        def tx(conn):
            if conn.execute(f"UPDATE users SET {column}=%s WHERE domain=%s AND local=%s",
                            (value, domain, local)).rowcount == 0:
                raise StoreError(f"no such user: {local}@{domain}")
        self._write(tx)

    def _user(self, row) -> User:
        domain, local, hashed, quota = row
        return User(local, domain, quota, self.maildir_for(local, domain), hashed)

    def _fetch_user(self, conn, local: str, domain: str) -> User | None:
        row = conn.execute("SELECT domain, local, password_hash, quota FROM users "
                           "WHERE domain=%s AND local=%s", (domain, local)).fetchone()
        return self._user(row) if row else None

    def get_user(self, address: str) -> User | None:
        try:
            local, domain = split_address(address)
        except StoreError:
            return None
        return self._cached(("u", local, domain),
                            lambda conn: self._fetch_user(conn, local, domain))

    def list_users(self, domain: str | None = None) -> list[User]:
        def query(conn):
            if domain is None:
                rows = conn.execute('SELECT domain, local, password_hash, quota FROM users '
                                    'ORDER BY domain COLLATE "C", local COLLATE "C"')
                return [self._user(r) for r in rows]
            d = normalize_domain(domain)
            if conn.execute("SELECT 1 FROM domains WHERE name=%s", (d,)).fetchone() is None:
                raise StoreError(f"no such domain: {d}")
            rows = conn.execute('SELECT domain, local, password_hash, quota FROM users '
                                'WHERE domain=%s ORDER BY local COLLATE "C"', (d,))
            return [self._user(r) for r in rows]
        return self.db.read(query)

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

        def tx(conn):
            if conn.execute(_LOCK_DOMAIN, (domain,)).fetchone() is None:
                raise StoreError(f"no such domain: {domain}")
            if conn.execute("SELECT 1 FROM users WHERE domain=%s AND local=%s",
                            (domain, local)).fetchone():
                raise StoreError(f"{local}@{domain} is a user; an alias of the same address "
                                 "would never be used (delete the user first)")
            conn.execute("INSERT INTO aliases(domain, local, targets) VALUES (%s, %s, %s) "
                         "ON CONFLICT (domain, local) DO UPDATE SET targets=excluded.targets",
                         (domain, local, clean))
        self._write(tx)

    def del_alias(self, address: str) -> None:
        local, domain = split_address(address)

        def tx(conn):
            if conn.execute("DELETE FROM aliases WHERE domain=%s AND local=%s",
                            (domain, local)).rowcount == 0:
                raise StoreError(f"no such alias: {local}@{domain}")
        self._write(tx)

    def get_alias(self, address: str) -> list[str] | None:
        try:
            local, domain = split_address(address)
        except StoreError:
            return None

        def query(conn):
            # An alias shadowed by a user is not used (as UserStore.get_alias).
            row = conn.execute("SELECT targets FROM aliases a WHERE domain=%s AND local=%s AND "
                               "NOT EXISTS (SELECT 1 FROM users u WHERE u.domain=a.domain AND "
                               "u.local=a.local)", (domain, local)).fetchone()
            return tuple(row[0]) if row else None
        hit = self._cached(("a", local, domain), query)
        return list(hit) if hit is not None else None     # a copy: callers may change it

    def list_aliases(self) -> list[tuple[str, list[str]]]:
        rows = self.db.read(lambda conn: conn.execute(
            'SELECT local, domain, targets FROM aliases '
            'ORDER BY domain COLLATE "C", local COLLATE "C"').fetchall())
        return [(f"{lo}@{d}", list(t)) for lo, d, t in rows]

    def shadowed_aliases(self) -> set[str]:
        """Aliases that are also users (as UserStore.shadowed_aliases)."""
        rows = self.db.read(lambda conn: conn.execute(
            "SELECT a.local, a.domain FROM aliases a JOIN users u "
            "ON u.domain=a.domain AND u.local=a.local").fetchall())
        return {f"{lo}@{d}" for lo, d in rows}

    # -- lookups for SMTP, delivery and POP3 --------------------------------------------------
    def lookup_recipient(self, address: str) -> str:
        """"user", "alias", "unknown" (our domain, no such name) or "remote" (not our domain)."""
        if not isinstance(address, str) or "@" not in address:
            return "unknown"
        return self._cached(("r", address),
                            lambda conn: self._lookup_recipient(conn, address))

    def peek_recipient(self, address: str):
        if not isinstance(address, str) or "@" not in address:
            return "unknown"
        return self.db.directory_cache.get(("r", address))

    @staticmethod
    def _lookup_recipient(conn, address: str) -> str:
        local_raw, domain_raw = address.rsplit("@", 1)
        try:
            domain = normalize_domain(domain_raw)
        except StoreError:
            return "remote"
        try:
            local = normalize_local(local_raw)
        except StoreError:
            local = None
        # One round trip for the three questions SQLite asks one after the other.
        is_domain, is_user, targets = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM domains WHERE name=%(d)s), "
            "EXISTS (SELECT 1 FROM users WHERE domain=%(d)s AND local=%(l)s), "
            "(SELECT cardinality(targets) FROM aliases WHERE domain=%(d)s AND local=%(l)s)",
            {"d": domain, "l": local}).fetchone()
        if not is_domain:
            return "remote"
        if local is None:
            return "unknown"
        if is_user:
            return "user"
        if targets:
            return "alias"
        return "unknown"

    def check_password(self, address: str, password: str) -> User | None:
        """Blocking bcrypt check against the hash in the database now (never a cached one:
        a password changed on another node is refused here at the next login)."""
        try:
            local, domain = split_address(address)
        except StoreError:
            user = None
        else:
            user = self.db.read(lambda conn: self._fetch_user(conn, local, domain))
        return passwords.login(user, password, self.bcrypt_cost, self._rehash)

    def _rehash(self, user: User, password: str) -> User:
        """An imported crypt(3) hash becomes bcrypt after a login proved the password, only
        if it is still the hash just verified (as UserStore._rehash)."""
        hashed = passwords.hash_password(password, self.bcrypt_cost)

        def tx(conn):
            return conn.execute("UPDATE users SET password_hash=%s WHERE domain=%s AND "
                                "local=%s AND password_hash=%s",
                                (hashed, user.domain, user.local, user.password_hash)).rowcount
        try:
            if self._write(tx) != 1:
                return user
        except (OSError, psycopg.Error):
            return user
        return User(user.local, user.domain, user.quota, user.maildir, hashed)


@implementer(IRemoteGrants)
class PgRelayGrants:
    """POP-before-SMTP grants in the shared database: a POP3 login on one node lets the same
    IP relay through every node.

    Expiry is kept on one clock for all nodes: the database's (`statement_timestamp()`),
    unless `clock` (seconds since the epoch) is given, as tests do. Answers are cached per IP
    with their local deadline; a grant or revocation anywhere invalidates that IP's entry
    through the watcher. The table is bounded by `MAX_GRANTS` at each `expire()` sweep.
    """

    def __init__(self, db: PgDatabase, clock: Callable[[], float] | None = None,
                 on_change: Callable[[str, str], None] | None = None) -> None:
        self.db = db
        self._clock = clock
        self._local = clock or db.monotonic      # deadlines of cached grants
        self._on_change = on_change

    def _now(self):
        return None if self._clock is None else float(self._clock())

    # `now` is the shared clock: ours when given, else the database's.
    _NOW = "coalesce(%(now)s::float8, extract(epoch FROM statement_timestamp()))"

    def grant(self, ip: str, seconds: float) -> None:
        if seconds <= 0:
            return
        ip = normalize_ip(ip)

        def tx(conn):
            conn.execute(f"INSERT INTO relay_grants(ip, expires) VALUES (%(ip)s, "
                         f"{self._NOW} + %(s)s) ON CONFLICT (ip) DO UPDATE "
                         "SET expires = excluded.expires",
                         {"ip": ip, "s": float(seconds), "now": self._now()})
        try:
            with self.db.connection() as conn:
                tx(conn)
        finally:
            self.db.grants_cache.invalidate(("g", ip))
        if self._on_change:
            self._on_change("grant", ip)

    def _deadline(self, ip: str):
        """The local time the grant for `ip` ends, or None."""
        start = self._local()
        row = self.db.read(lambda conn: conn.execute(
            f"SELECT expires - {self._NOW} FROM relay_grants WHERE ip = %(ip)s",
            {"ip": ip, "now": self._now()}).fetchone())
        if row is None or row[0] <= 0:
            return None
        return start + row[0]

    def is_granted(self, ip: str) -> bool:
        ip = normalize_ip(ip)
        cache = self.db.grants_cache
        deadline = cache.get(("g", ip))
        if deadline is MISS:
            epoch = cache.epoch()
            deadline = self._deadline(ip)
            cache.put(("g", ip), deadline, epoch)
        return deadline is not None and deadline > self._local()

    def peek(self, ip: str):
        hit = self.db.grants_cache.get(("g", normalize_ip(ip)))
        if hit is MISS:
            return MISS
        return hit is not None and hit > self._local()

    def expire(self) -> list[str]:
        """Drop expired grants (and the oldest past MAX_GRANTS); returns their IPs."""
        def tx(conn):
            gone = [r[0] for r in conn.execute(
                f"DELETE FROM relay_grants WHERE expires <= {self._NOW} RETURNING ip",
                {"now": self._now()})]
            gone += [r[0] for r in conn.execute(
                "DELETE FROM relay_grants WHERE ip IN (SELECT ip FROM relay_grants "
                "ORDER BY expires DESC OFFSET %s) RETURNING ip", (MAX_GRANTS,))]
            return gone
        with self.db.connection() as conn:
            with conn.transaction():
                gone = tx(conn)
        for ip in gone:
            self.db.grants_cache.invalidate(("g", ip))
            if self._on_change:
                self._on_change("expire", ip)
        return gone

    def entries(self) -> list[tuple[str, float]]:
        """(ip, seconds left) for every valid grant, soonest expiry first."""
        rows = self.db.read(lambda conn: conn.execute(
            f"SELECT ip, expires - {self._NOW} AS left FROM relay_grants "
            f"WHERE expires > {self._NOW} ORDER BY expires",
            {"now": self._now()}).fetchall())
        return [(ip, float(left)) for ip, left in rows]
