"""The user store: vpopmail semantics, validation against traversal, concurrent writers.

Every test taking `backend` or `store` runs against both backends of IUserDirectory: the
embedded SQLite store and PostgreSQL (a private cluster, tests/pg_support.py). The SQLite
runs assert exactly what they asserted before PostgreSQL existed; `backend.settle(store)` is
a no-op there (its cache checks its token at every lookup) and, for PostgreSQL, waits until
`store`'s watcher has handled every notification committed before (tests of the staleness
bound itself, without settle, are in tests/integration/test_pg_directory.py)."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailappliance.users import passwords
from mailappliance.users.backend import open_directory
from mailappliance.users.directory import DirectoryUnavailable, IRemoteDirectory, IUserDirectory
from mailappliance.users.store import StoreError, UserStore, _Tx

RECHECK_SECONDS = _Tx.RECHECK_SECONDS

PW = "Passw0rd!"


def open_spec(spec: tuple):
    """A store from a picklable description (also in a spawned process)."""
    database, data_dir, mailboxes = spec
    return open_directory(database, data_dir, mailboxes, 4)


class Backend:
    """One backing store (a data directory, or a database plus a Maildir tree) that tests
    open several stores on, as the server, the CLI and other nodes do."""

    def __init__(self, name, tmp_path, cluster=None, dbname=None):
        self.name, self.tmp_path, self.cluster, self.dbname = name, tmp_path, cluster, dbname
        self.spec = ("", str(tmp_path), "") if cluster is None else \
            (cluster.uri(dbname), str(tmp_path), str(tmp_path / "domains"))
        self.opened = []

    def open(self):
        store = open_spec(self.spec)
        self.opened.append(store)
        return store

    def settle(self, store) -> None:
        if IRemoteDirectory.providedBy(store):
            store.sync()

    def raw(self) -> bytes:
        """Every byte the backend keeps on disk for the directory."""
        if self.cluster is None:
            return (self.tmp_path / "users.sqlite").read_bytes()
        with self.cluster.admin() as conn:
            conn.execute("CHECKPOINT")
            oid = conn.execute("SELECT oid FROM pg_database WHERE datname=%s",
                               (self.dbname,)).fetchone()[0]
        files = [p for d in (self.cluster.data / "base" / str(oid), self.cluster.data / "pg_wal")
                 for p in d.iterdir() if p.is_file()]
        assert files
        return b"".join(p.read_bytes() for p in files)

    def close_all(self):
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        b = Backend("sqlite", tmp_path)
    else:
        cluster, dbname = request.getfixturevalue("pg_database")
        b = Backend("postgresql", tmp_path, cluster, dbname)
    yield b
    b.close_all()


@pytest.fixture
def store(backend):
    return backend.open()


def test_both_backends_provide_the_interface(store):
    assert verifyObject(IUserDirectory, store)


def test_domain_user_alias_round_trip(store, tmp_path):
    assert store.add_domain("Test.COM") == "test.com"
    assert store.has_domain("TEST.com")
    u = store.add_user("Joe@Test.com", PW, quota=5000)
    assert (u.local, u.domain, u.quota) == ("joe", "test.com", 5000)
    for sub in ("tmp", "new", "cur"):
        assert (tmp_path / "domains/test.com/joe/Maildir" / sub).is_dir()
    assert store.get_user("JOE@test.com").address == "joe@test.com"
    store.add_alias("info@test.com", ["joe@test.com", "someone@Example.ORG"])
    assert store.get_alias("info@test.com") == ["joe@test.com", "someone@example.org"]
    assert store.lookup_recipient("joe@TEST.com") == "user"
    assert store.lookup_recipient("info@test.com") == "alias"
    assert store.lookup_recipient("nobody@test.com") == "unknown"
    assert store.lookup_recipient("joe@example.org") == "remote"
    store.del_alias("info@test.com")
    assert store.get_alias("info@test.com") is None
    store.del_user("joe@test.com")
    assert store.get_user("joe@test.com") is None
    assert not (tmp_path / "domains/test.com/joe").exists()
    store.del_domain("test.com")
    assert store.list_domains() == []


def test_role_aliases_go_to_first_user_or_named_postmaster(store):
    store.add_domain("a.example")
    assert store.lookup_recipient("postmaster@a.example") == "unknown", \
        "no target yet: refuse at RCPT rather than lose mail"
    store.add_user("first@a.example", PW)
    store.add_user("second@a.example", PW)
    for role in ("postmaster", "abuse", "mailer-daemon"):
        assert store.get_alias(f"{role}@a.example") == ["first@a.example"]
    store.add_domain("b.example", postmaster="boss")
    assert store.get_alias("abuse@b.example") == ["boss@b.example"]


def test_passwords_are_bcrypt_hashes_only(store, backend):
    store.add_domain("test.com")
    store.add_user("joe@test.com", PW)
    raw = backend.raw()
    assert PW.encode() not in raw
    assert store.get_user("joe@test.com").password_hash.startswith("$2")
    assert store.check_password("joe@test.com", PW).address == "joe@test.com"
    assert store.check_password("joe@test.com", "Wrong0ne!") is None
    assert store.check_password("nobody@test.com", PW) is None
    store.set_password("joe@test.com", "N3w-secret")
    assert store.check_password("joe@test.com", PW) is None
    assert store.check_password("joe@test.com", "N3w-secret") is not None


@pytest.mark.parametrize("pw, why", [
    ("Sh0rt!", "too short"), ("lettersonly!", "at least one digit"),
    ("12345678!", "at least one letter"), ("Passw0rdX", "at least one symbol"),
    ("A1!" + "x" * 80, "too long"), ("Pass\nw0rd!", "NUL, CR or LF"),
])
def test_password_policy(store, pw, why):
    store.add_domain("test.com")
    with pytest.raises(StoreError, match=why):
        store.add_user("joe@test.com", pw)
    assert passwords.check_policy(pw) is not None


@pytest.mark.parametrize("address", [
    "../etc@test.com", "a/b@test.com", "a\0b@test.com", "..@test.com", ".hidden@test.com",
    "a..b@test.com", "x" * 65 + "@test.com", "tab\there@test.com", "ünï@test.com",
    "joe@../../etc", "joe@test.com/..", "joe@", "@test.com", "joe", "a@b@test.com",
])
def test_names_cannot_escape_the_data_directory(store, tmp_path, address):
    store.add_domain("test.com")
    with pytest.raises(StoreError):
        store.add_user(address, PW)
    created = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    assert all(str(p).startswith(("domains", "users.sqlite")) for p in created)


@pytest.mark.parametrize("name", ["..", "a/b.com", "a\0.com", "-bad.com", "x" * 64 + ".com",
                                  "nodot", "a..b.com", "a b.com", "a.b.c" + ".d" * 130])
def test_bad_domain_names(store, name):
    with pytest.raises(StoreError):
        store.add_domain(name)


def test_unicode_domain_is_stored_as_idna(store, tmp_path):
    assert store.add_domain("Bücher.example") == "xn--bcher-kva.example"
    assert store.has_domain("bücher.example")
    assert (tmp_path / "domains" / "xn--bcher-kva.example").is_dir()


def test_refusals_are_store_errors(store):
    with pytest.raises(StoreError, match="no such domain"):
        store.add_user("a@nowhere.example", PW)
    store.add_domain("test.com")
    with pytest.raises(StoreError, match="already exists"):
        store.add_domain("TEST.com")
    store.add_user("a@test.com", PW)
    with pytest.raises(StoreError, match="already exists"):
        store.add_user("A@test.com", PW)
    with pytest.raises(StoreError, match="no such user"):
        store.del_user("b@test.com")
    with pytest.raises(StoreError, match="itself"):
        store.add_alias("x@test.com", ["x@test.com"])
    with pytest.raises(StoreError, match="bad alias target"):
        store.add_alias("x@test.com", ["not an address"])


def _writer(spec: tuple, n: int, worker: int, start=None) -> None:
    s = open_spec(spec)
    if start is not None:
        start.wait(60)          # every writer's first user at once: the domain's first user
    for i in range(n):
        s.add_alias(f"w{worker}-{i}@test.com", [f"t{i}@example.org"])
        if i % 5 == 0:
            s.add_user(f"u{worker}-{i}@test.com", PW)
    s.close()


def test_concurrent_writer_processes_lose_nothing(store, backend):
    """The server and the CLI write at once: WAL plus busy waits serialise them safely
    (PostgreSQL: its own locking; several nodes write at once)."""
    store.add_domain("test.com")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)      # (all four racing to become its postmaster once deadlocked)
    procs = [ctx.Process(target=_writer, args=(backend.spec, 40, w, start)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    aliases = {a for a, _ in store.list_aliases()}
    assert all(f"w{w}-{i}@test.com" in aliases for w in range(4) for i in range(40))
    assert len(store.list_users("test.com")) == 4 * 8


def test_a_write_rolled_back_by_the_database_is_run_again(pg_database, tmp_path):
    """PostgreSQL answers two writers that lock each other out (a deadlock, a serialization
    failure) by rolling one back: that write runs again, and the circuit breaker that guards
    against a database that is down does not trip for it."""
    import psycopg

    backend = Backend("postgresql", tmp_path, *pg_database)
    store = backend.open()
    store.add_domain("test.com")
    tries = []

    def tx(conn):
        conn.execute("INSERT INTO aliases(domain, local, targets) VALUES "
                     "('test.com', 'x', ARRAY['y@example.org'])")
        tries.append(1)
        if len(tries) < 3:
            raise (psycopg.errors.DeadlockDetected if len(tries) == 1
                   else psycopg.errors.SerializationFailure)("rolled back")
        return "done"
    assert store._write(tx) == "done"
    assert len(tries) == 3
    assert store.get_alias("x@test.com") == ["y@example.org"]       # one row: earlier tries undone

    def always(conn):
        raise psycopg.errors.DeadlockDetected("deadlock detected")
    with pytest.raises(DirectoryUnavailable, match="deadlock detected"):
        store._write(always)
    assert store.has_domain("test.com")                                # no breaker: answers at once
    backend.close_all()


def test_a_second_store_sees_changes_at_once(backend, tmp_path):
    a, b = backend.open(), backend.open()
    a.add_domain("test.com")
    backend.settle(b)
    assert b.has_domain("test.com")
    a.add_user("joe@test.com", PW)
    backend.settle(b)
    assert b.lookup_recipient("joe@test.com") == "user"
    if backend.name == "sqlite":
        a.close(), b.close()
        assert os.path.exists(tmp_path / "users.sqlite")


def test_cached_lookups_follow_every_change(backend):
    """Lookups are cached per connection, yet a change by anyone counts from the next lookup."""
    server, cli = backend.open(), backend.open()
    settle = backend.settle
    assert not server.has_domain("test.com")
    assert server.lookup_recipient("joe@test.com") == "remote"
    assert server.lookup_recipient("joe@test.com") == "remote"        # a cached answer
    cli.add_domain("test.com")                                          # another connection
    settle(server)
    assert server.has_domain("test.com")
    assert server.lookup_recipient("joe@test.com") == "unknown"
    cli.add_user("joe@test.com", PW)
    settle(server)
    assert server.lookup_recipient("joe@test.com") == "user"
    cli.add_alias("info@test.com", ["joe@test.com"])
    settle(server)
    assert server.lookup_recipient("info@test.com") == "alias"
    cli.del_alias("info@test.com")
    settle(server)
    assert server.lookup_recipient("info@test.com") == "unknown"
    server.del_user("joe@test.com")                                     # this connection
    assert server.lookup_recipient("joe@test.com") == "unknown"
    settle(cli)
    assert cli.lookup_recipient("joe@test.com") == "unknown"
    server.del_domain("test.com")
    assert not server.has_domain("test.com")
    settle(cli)
    assert not cli.has_domain("test.com")


def test_cached_lookups_see_another_process(backend):
    store = backend.open()
    store.add_domain("test.com")
    assert store.lookup_recipient("w0-0@test.com") == "unknown"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_writer, args=(backend.spec, 1, 0))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    backend.settle(store)
    assert store.lookup_recipient("w0-0@test.com") == "alias"


def test_cache_notices_a_foreign_writer_through_data_version(tmp_path):
    """A program writing users.sqlite without mailappliance: seen within RECHECK_SECONDS."""
    import sqlite3

    clock = Clock()
    store = UserStore(tmp_path, 4, clock=clock.seconds)
    store.add_domain("test.com")
    assert store.lookup_recipient("raw@test.com") == "unknown"
    db = sqlite3.connect(tmp_path / "users.sqlite", isolation_level=None)
    db.execute("INSERT INTO aliases(domain, local, targets) VALUES ('test.com', 'raw', ?)",
               ('["x@example.org"]',))
    db.close()
    clock.advance(RECHECK_SECONDS - 0.1)
    assert store.lookup_recipient("raw@test.com") == "unknown"     # the cached answer, still
    clock.advance(0.1)
    assert store.lookup_recipient("raw@test.com") == "alias"
    store.close()


def test_unwritable_generation_file_falls_back_to_data_version(tmp_path):
    """users.sqlite-gen left unwritable (say, created by root): changes are still seen, within
    RECHECK_SECONDS, through SQLite's data_version."""
    def no_write(path, flags, *args):
        if str(path).endswith("users.sqlite-gen") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return os.open(path, flags, *args)

    UserStore(tmp_path, 4).close()                 # the file exists, as root left it
    clock = Clock()
    a = UserStore(tmp_path, 4, clock=clock.seconds, opener=no_write)
    b = UserStore(tmp_path, 4, clock=clock.seconds, opener=no_write)
    assert a.generation._map is not None and not a.generation._writable
    b.add_domain("test.com")
    assert a.lookup_recipient("joe@test.com") == "unknown"
    b.add_user("joe@test.com", PW)
    assert a.lookup_recipient("joe@test.com") == "unknown"     # no token: the cached answer
    clock.advance(RECHECK_SECONDS)
    assert a.lookup_recipient("joe@test.com") == "user"
    a.close(), b.close()


def test_new_domains_and_users_are_stamped_with_the_wallclock(tmp_path):
    store = UserStore(tmp_path, 4, wallclock=lambda: 1_700_000_000.5)
    store.add_domain("test.com")
    store.add_user("joe@test.com", PW)
    db = store._db().conn
    assert db.execute("SELECT created FROM domains").fetchall() == [(1_700_000_000.5,)]
    assert db.execute("SELECT created FROM users").fetchall() == [(1_700_000_000.5,)]
    store.close()


def test_cached_users_and_aliases_follow_every_change(backend):
    """Local delivery asks get_user/get_alias for every message: cached, yet never stale."""
    server, cli = backend.open(), backend.open()
    settle = backend.settle
    cli.add_domain("test.com")
    assert server.get_user("joe@test.com") is None
    assert server.get_user("joe@test.com") is None                     # a cached miss
    cli.add_user("joe@test.com", PW, quota=100)
    settle(server)
    assert server.get_user("joe@test.com").quota == 100
    cli.set_quota("joe@test.com", 200)
    settle(server)
    assert server.get_user("JOE@test.com").quota == 200
    old_hash = server.get_user("joe@test.com").password_hash
    cli.set_password("joe@test.com", PW + "x")
    settle(server)
    assert server.get_user("joe@test.com").password_hash != old_hash
    assert server.check_password("joe@test.com", PW + "x") is not None
    assert server.get_alias("info@test.com") is None
    cli.add_alias("info@test.com", ["joe@test.com"])
    settle(server)
    targets = server.get_alias("info@test.com")
    assert targets == ["joe@test.com"]
    targets.append("mutated@test.com")                                  # a copy each time
    assert server.get_alias("info@test.com") == ["joe@test.com"]
    cli.add_alias("info@test.com", ["joe@test.com", "ann@example.org"])
    settle(server)
    assert server.get_alias("info@test.com") == ["joe@test.com", "ann@example.org"]
    cli.del_user("joe@test.com")
    settle(server)
    assert server.get_user("joe@test.com") is None
