"""The PostgreSQL directory against a real private cluster: schema creation and migrations, the
privileges it needs, where its password comes from, how stale its cache may be, and what a
node does when the database goes away.

The behaviour both backends share (names, refusals, cached lookups following changes) is in
tests/unit/test_user_store.py and test_relay_grants.py, run against both.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.pg_support import require_psycopg

require_psycopg(module_level=True)

from mailappliance.users import pgschema  # noqa: E402
from mailappliance.users.directory import MISS, DirectoryUnavailable  # noqa: E402
from mailappliance.users.pgstore import (  # noqa: E402
    MAX_STALE_SECONDS,
    PgDatabase,
    PgRelayGrants,
    PgUserStore,
    describe,
)

PW = "Passw0rd!"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def quiet_write(cluster, dbname: str, sql: str, params=()) -> None:
    """A change whose NOTIFY never fires (triggers off for this session, as superuser): what
    a watcher that missed the notification would see."""
    with cluster.admin(dbname) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(sql, params)


@pytest.fixture
def opened():
    things = []
    yield things
    for t in reversed(things):
        t.close()


# --- schema ----------------------------------------------------------------------------------

def test_schema_is_created_on_an_empty_database_and_left_alone_after(pg_uri, tmp_path, opened):
    store = PgUserStore(pg_uri, tmp_path, 4)
    opened.append(store)
    with store.db.connection() as conn:
        assert pgschema.installed_version(conn) == pgschema.CURRENT_VERSION
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (pgschema.SCHEMA,))}
        assert pgschema.migrate(conn) == (pgschema.CURRENT_VERSION,) * 2     # nothing to do
    assert tables == {"schema_version", "domains", "users", "aliases", "relay_grants"}


def test_an_older_schema_is_upgraded_and_a_newer_one_refused(pg_uri, tmp_path, opened):
    store = PgUserStore(pg_uri, tmp_path, 4)
    opened.append(store)
    store.add_domain("test.com")
    store.add_user("joe@test.com", PW)
    step2 = pgschema.MIGRATIONS + (
        (pgschema.CURRENT_VERSION + 1,
         f"ALTER TABLE {pgschema.SCHEMA}.users ADD COLUMN note text DEFAULT 'upgraded'"),)
    newer = PgDatabase(pg_uri, migrations=step2)
    opened.append(newer)
    assert newer.ensure_schema() == (pgschema.CURRENT_VERSION, pgschema.CURRENT_VERSION + 1)
    with newer.connection() as conn:
        assert conn.execute("SELECT note FROM users").fetchall() == [("upgraded",)]
    assert store.get_user("joe@test.com") is not None            # the data went along
    with pytest.raises(pgschema.SchemaError, match="newer than this mailappliance knows"):
        PgUserStore(pg_uri, tmp_path, 4)


def test_nodes_starting_together_create_the_schema_once(pg_uri, tmp_path, opened):
    dbs = [PgDatabase(pg_uri) for _ in range(4)]
    opened.extend(dbs)
    results, errors = [], []
    go = threading.Barrier(len(dbs))

    def start(db):
        go.wait()
        try:
            results.append(db.ensure_schema())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=start, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results)[-1] == (pgschema.CURRENT_VERSION, pgschema.CURRENT_VERSION)
    assert results.count((0, pgschema.CURRENT_VERSION)) == 1
    with dbs[0].connection() as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == \
            len(pgschema.MIGRATIONS)


def test_a_role_with_table_rights_only_runs_a_node_but_cannot_create(
        pg_database, tmp_path, opened):
    """The documented privileges: the owner creates; a node's role needs USAGE and DML."""
    cluster, dbname = pg_database
    with cluster.admin() as conn:
        conn.execute("DROP ROLE IF EXISTS node_role")
        conn.execute("CREATE ROLE node_role LOGIN PASSWORD 'node-pw-1'")
    uri = cluster.uri(dbname, user="node_role", password="node-pw-1")
    with pytest.raises(pgschema.SchemaError, match="cannot create schema mailappliance"):
        PgUserStore(uri, tmp_path, 4)
    owner = PgUserStore(cluster.uri(dbname), tmp_path, 4)        # the operator, once
    opened.append(owner)
    with cluster.admin(dbname) as conn:
        conn.execute("GRANT USAGE ON SCHEMA mailappliance TO node_role")
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "
                     "mailappliance TO node_role")
    node = PgUserStore(uri, tmp_path, 4)
    opened.append(node)
    node.add_domain("test.com")
    node.add_user("joe@test.com", PW)
    PgRelayGrants(node.db).grant("192.0.2.1", 60)
    assert node.lookup_recipient("postmaster@test.com") == "alias"


# --- connecting -------------------------------------------------------------------------------

def test_password_from_pgpassfile_and_never_in_messages(pg_database, tmp_path, monkeypatch,
                                                         opened):
    cluster, dbname = pg_database
    bare = cluster.uri(dbname, password=None)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{cluster.port}:{dbname}:mailappliance:{cluster.password}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    store = PgUserStore(bare, tmp_path / "boxes", 4)
    opened.append(store)
    assert store.list_domains() == []

    wrong = cluster.uri(dbname, password="Wr0ng-secret")
    assert "Wr0ng-secret" not in describe(wrong)
    assert describe(wrong) == f"postgresql://mailappliance@127.0.0.1:{cluster.port}/{dbname}"
    with pytest.raises(DirectoryUnavailable) as failed:
        PgUserStore(wrong, tmp_path / "boxes", 4)
    assert "Wr0ng-secret" not in str(failed.value)
    assert "password authentication failed" in str(failed.value)     # the server's reason
    assert isinstance(failed.value, OSError)            # what SMTP and delivery treat as 4xx


# --- staleness --------------------------------------------------------------------------------

def test_another_node_sees_a_change_within_the_bound_without_asking(pg_uri, tmp_path, opened):
    """DESIGN.md 6: within 2 s; here by NOTIFY, no sync() and no extra query per lookup."""
    a, b = PgUserStore(pg_uri, tmp_path, 4), PgUserStore(pg_uri, tmp_path, 4)
    opened += [a, b]
    a.add_domain("test.com")
    b.sync()
    assert b.lookup_recipient("joe@test.com") == "unknown"
    assert b.peek_recipient("joe@test.com") == "unknown", "answered from the cache"
    a.add_user("joe@test.com", PW)
    changed = time.monotonic()
    while b.lookup_recipient("joe@test.com") != "user":
        assert time.monotonic() - changed < 2.0, "not seen within DESIGN.md's 2 seconds"
    # and the grant made on one node, likewise
    ga, gb = PgRelayGrants(a.db), PgRelayGrants(b.db)
    assert not gb.is_granted("192.0.2.9")
    ga.grant("192.0.2.9", 60)
    changed = time.monotonic()
    while not gb.is_granted("192.0.2.9"):
        assert time.monotonic() - changed < 2.0


def test_cache_is_not_trusted_once_the_watcher_falls_silent(pg_database, tmp_path, opened):
    """A notification that never came: the cached answer lasts MAX_STALE_SECONDS at most."""
    cluster, dbname = pg_database
    clock = FakeMonotonic()
    db = PgDatabase(cluster.uri(dbname), monotonic=clock, probe_seconds=3600)
    opened.append(db)
    store = PgUserStore(db, tmp_path, 4)
    store.add_domain("test.com")
    store.sync()
    assert store.lookup_recipient("raw@test.com") == "unknown"
    quiet_write(cluster, dbname, "INSERT INTO mailappliance.aliases VALUES "
                "('test.com', 'raw', ARRAY['x@example.org'])")
    assert store.lookup_recipient("raw@test.com") == "unknown", "the cache did answer"
    clock.now += MAX_STALE_SECONDS + 0.001        # no probe went through since
    assert store.peek_recipient("raw@test.com") is MISS
    assert store.lookup_recipient("raw@test.com") == "alias"


def test_password_checks_never_use_the_cache(pg_database, tmp_path, opened):
    cluster, dbname = pg_database
    db = PgDatabase(cluster.uri(dbname), probe_seconds=3600)
    opened.append(db)
    node_a = PgUserStore(db, tmp_path, 4)
    node_a.add_domain("test.com")
    node_a.add_user("joe@test.com", PW)
    node_a.sync()
    old = node_a.get_user("joe@test.com").password_hash
    assert node_a.check_password("joe@test.com", PW) is not None
    from mailappliance.users import passwords
    new_hash = passwords.hash_password("N3w-secret!", 4)
    quiet_write(cluster, dbname, "UPDATE mailappliance.users SET password_hash=%s", (new_hash,))
    assert node_a.get_user("joe@test.com").password_hash == old       # cached for delivery
    assert node_a.check_password("joe@test.com", PW) is None          # refused at once
    assert node_a.check_password("joe@test.com", "N3w-secret!") is not None


def test_a_reconnected_watcher_forgets_what_it_may_have_missed(pg_database, tmp_path, opened):
    cluster, dbname = pg_database
    store = PgUserStore(cluster.uri(dbname), tmp_path, 4)
    opened.append(store)
    store.add_domain("test.com")
    store.sync()
    assert store.lookup_recipient("raw@test.com") == "unknown"
    before = store.db.watcher.reconnects
    with cluster.admin(dbname) as conn:        # every session of ours: watcher and pool
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO mailappliance.aliases VALUES "
                     "('test.com', 'raw', ARRAY['x@example.org'])")
    store.sync(timeout=10)                     # waits for the watcher to be back
    assert store.db.watcher.reconnects > before
    assert store.lookup_recipient("raw@test.com") == "alias"
    assert store.list_domains() == ["test.com"]    # the pool replaced its broken connections


# --- the database goes away --------------------------------------------------------------------

def test_lookups_fail_temporarily_while_the_database_is_down_and_recover(
        postgres_cluster, tmp_path, opened):
    """Never a stale accept: past the bound every lookup raises DirectoryUnavailable."""
    cluster = postgres_cluster
    dbname = cluster.create_database()
    try:
        store = PgUserStore(cluster.uri(dbname), tmp_path, 4)
        opened.append(store)
        grants = PgRelayGrants(store.db)
        store.add_domain("test.com")
        store.add_user("joe@test.com", PW)
        grants.grant("192.0.2.1", 600)
        store.sync()
        assert store.lookup_recipient("joe@test.com") == "user"
        assert grants.is_granted("192.0.2.1")
        cluster.stop("fast")
        try:
            deadline = time.monotonic() + MAX_STALE_SECONDS + 2.0
            while store.peek_recipient("joe@test.com") is not MISS:
                assert time.monotonic() < deadline, "cache still trusted without a database"
            for call in (lambda: store.lookup_recipient("joe@test.com"),
                         lambda: store.has_domain("test.com"),
                         lambda: grants.is_granted("192.0.2.1"),
                         lambda: store.check_password("joe@test.com", PW),
                         lambda: store.add_domain("other.com")):
                with pytest.raises(DirectoryUnavailable):
                    call()
        finally:
            cluster.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert store.lookup_recipient("joe@test.com") == "user"
                break
            except DirectoryUnavailable:
                assert time.monotonic() < deadline, "no recovery after the database returned"
        assert grants.is_granted("192.0.2.1")
        store.sync(timeout=10)
    finally:
        cluster.drop_database(dbname)


# --- POP3's lock across nodes ------------------------------------------------------------------

def test_mailbox_locks_exclude_other_nodes_and_die_with_their_node(pg_database, tmp_path,
                                                                   opened):
    from mailappliance.pop3.mailbox import MailboxBusy
    from mailappliance.pop3.nodelock import NodeLockedMaildir
    cluster, dbname = pg_database
    a = PgUserStore(cluster.uri(dbname), tmp_path, 4)
    b = PgUserStore(cluster.uri(dbname), tmp_path, 4)
    opened.extend([a, b])
    token = a.mailbox_locks.try_lock("joe@test.com")
    assert token is not None
    assert b.mailbox_locks.try_lock("joe@test.com") is None         # another node
    assert a.mailbox_locks.try_lock("joe@test.com") is None         # the same node
    assert b.mailbox_locks.try_lock("ann@test.com") is not None     # another mailbox
    assert a.mailbox_locks.held(token)
    # A's lock connection dies (the node is gone, or its network): the lock goes with it,
    # B may take it, and A knows its lock is lost.
    with cluster.admin(dbname) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                     "locktype = 'advisory' AND pid <> pg_backend_pid() AND "
                     "objid = (%s::bigint & 4294967295)::oid",
                     (token.key,))
    taken = None
    deadline = time.monotonic() + 10
    while taken is None and time.monotonic() < deadline:
        taken = b.mailbox_locks.try_lock("joe@test.com")
    assert taken is not None
    assert not a.mailbox_locks.held(token)
    # A Maildir whose lock was lost applies no QUIT; a new session on A is refused while B
    # holds the lock, and A's lock connection comes back by itself.
    box = tmp_path / "test.com" / "joe" / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    (box / "new" / "1.M1P1Q1.node-a").write_bytes(b"x\r\n")
    session = NodeLockedMaildir(box, a.mailbox_locks, "joe@test.com")
    with pytest.raises(MailboxBusy):
        session.lock()
    b.mailbox_locks.unlock(taken)
    deadline = time.monotonic() + 10
    while True:
        try:
            session.lock()
            break
        except MailboxBusy:
            assert time.monotonic() < deadline, "B's queued unlock never ran"
    messages = session.scan()
    assert session.update(messages, []) == 0                        # held: applied
    assert not list((box / "new").iterdir())
    session.unlock()


# --- main's store rules, on PostgreSQL ---------------------------------------------------------

def test_postgresql_store_follows_the_sqlite_rules_for_collisions_and_domain_del(
        pg_uri, tmp_path, opened):
    from mailappliance.users.store import StoreError
    store = PgUserStore(pg_uri, tmp_path, 4)
    opened.append(store)
    store.add_domain("test.com")
    store.add_user("postmaster@test.com", PW)        # a role name that is a real mailbox
    assert store.get_alias("postmaster@test.com") is None
    assert store.get_alias("abuse@test.com") == ["postmaster@test.com"]
    store.add_alias("info@test.com", ["postmaster@test.com"])
    with pytest.raises(StoreError, match="is an alias"):
        store.add_user("info@test.com", PW)
    with pytest.raises(StoreError, match="is a user"):
        store.add_alias("postmaster@test.com", ["x@example.org"])
    assert store.shadowed_aliases() == set()
    (store.maildir_for("postmaster", "test.com") / "new" / "1.x").write_bytes(b"m\r\n")
    with pytest.raises(StoreError, match="1 message"):
        store.del_domain("test.com")
    assert store.has_domain("test.com")
    assert store.del_domain("test.com", force=True) == 1
    assert not (tmp_path / "test.com").exists()
