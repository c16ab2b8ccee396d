"""The PostgreSQL schema of the user directory and roaming grants, and its migrations.

Everything lives in one schema, `mailappliance`, so the product never touches `public` (which
PostgreSQL 15 no longer opens to every role) or another application's tables. The product
creates it on an empty database and upgrades an older one, in order, one transaction per
version, under an advisory lock so that two nodes starting at once neither race nor apply a
step twice; a database newer than this code is refused (a downgrade cannot guess what the
newer schema means).

Privileges (docs: the role in `[users] database`):
- creating the schema (first start on an empty database): CREATE on the database, e.g. the
  role owns it (`CREATE DATABASE mail OWNER mailappliance`);
- upgrading: ownership of the schema `mailappliance` and its tables (the role that created
  them);
- running against a current schema: USAGE on the schema and SELECT, INSERT, UPDATE, DELETE on
  its tables, nothing more (LISTEN and advisory locks need no grant). Nodes may thus run with
  a role that cannot change the schema once the operator has run `mailappliance check` (or
  any CLI command) with the owner's role.

Cross-node cache invalidation is done by the database itself: a trigger on every table NOTIFYs
channel `mailappliance` after each change (statement level for the directory, one per row with
the IP for grants), so a change made with psql counts too. NOTIFY is delivered at COMMIT, in
commit order, to every session that LISTENs (pgstore's watcher).
"""

from __future__ import annotations

from mailappliance.users.store import StoreError

SCHEMA = "mailappliance"
CHANNEL = "mailappliance"
# pg_advisory_xact_lock key for migrations: "mailappl" as a big-endian int64, so it cannot
# collide with small keys another application picks.
MIGRATION_LOCK = int.from_bytes(b"mailappl", "big") & 0x7FFF_FFFF_FFFF_FFFF

# (version, SQL). Append only: a released step is never edited, the next change is a new one.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, f"""
CREATE TABLE {SCHEMA}.domains (
    name text PRIMARY KEY,
    postmaster text,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {SCHEMA}.users (
    domain text NOT NULL REFERENCES {SCHEMA}.domains(name) ON DELETE CASCADE,
    local text NOT NULL,
    password_hash text NOT NULL,
    quota bigint NOT NULL DEFAULT 0 CHECK (quota >= 0),
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, local)
);
CREATE TABLE {SCHEMA}.aliases (
    domain text NOT NULL REFERENCES {SCHEMA}.domains(name) ON DELETE CASCADE,
    local text NOT NULL,
    targets text[] NOT NULL,
    PRIMARY KEY (domain, local)
);
-- expires: seconds since the epoch on one clock shared by all nodes (the database's, unless
-- the product is given another); a node's own clock jumping changes no grant.
CREATE TABLE {SCHEMA}.relay_grants (
    ip text PRIMARY KEY,
    expires double precision NOT NULL
);
CREATE INDEX relay_grants_expires ON {SCHEMA}.relay_grants (expires);

CREATE FUNCTION {SCHEMA}.notify_directory() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', 'directory');
    RETURN NULL;
END $$;
CREATE TRIGGER domains_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON {SCHEMA}.domains FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_directory();
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON {SCHEMA}.users FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_directory();
CREATE TRIGGER aliases_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON {SCHEMA}.aliases FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_directory();

CREATE FUNCTION {SCHEMA}.notify_grant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('{CHANNEL}', 'grant ' || OLD.ip);
    ELSE
        PERFORM pg_notify('{CHANNEL}', 'grant ' || NEW.ip);
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION {SCHEMA}.notify_grants() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', 'grants');
    RETURN NULL;
END $$;
CREATE TRIGGER relay_grant_changed AFTER INSERT OR UPDATE OR DELETE
    ON {SCHEMA}.relay_grants FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.notify_grant();
CREATE TRIGGER relay_grants_truncated AFTER TRUNCATE
    ON {SCHEMA}.relay_grants FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.notify_grants();
"""),
)

CURRENT_VERSION = MIGRATIONS[-1][0]


class SchemaError(StoreError):
    """The database's schema cannot be used or brought up to date; str() is one line."""


def installed_version(conn) -> int:
    """0 for a database without our schema; else the highest applied version."""
    # pg_class through the statement's snapshot, not to_regclass(): the latter answers from
    # this backend's catalog cache, which may not yet know a table another node just made.
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = 'schema_version')", (SCHEMA,)).fetchone()
    if not row[0]:
        return 0
    return conn.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_version"
                        ).fetchone()[0]


def migrate(conn, migrations: tuple[tuple[int, str], ...] = MIGRATIONS) -> tuple[int, int]:
    """Create or upgrade the schema on `conn` (a psycopg connection in autocommit mode).

    Returns (version found, version now). Cheap when nothing is to be done: one query. Raises
    SchemaError for a newer schema or a step the role is not allowed to run.
    """
    import psycopg

    target = migrations[-1][0]
    found = installed_version(conn)
    if found == target:
        return found, found
    if found > target:
        raise SchemaError(f"the database's schema {SCHEMA} is at version {found}, newer than "
                          f"this mailappliance knows ({target}): upgrade mailappliance")
    # A session lock taken before the transaction begins: the transaction then starts after
    # whatever another node committed while we waited, catalog included.
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        with conn.transaction():
            found = installed_version(conn)       # another node may have done it meanwhile
            if found > target:
                raise SchemaError(f"the database's schema {SCHEMA} is at version {found}, "
                                  f"newer than this mailappliance knows ({target})")
            if found == 0:
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version ("
                             "version integer PRIMARY KEY, "
                             "applied timestamptz NOT NULL DEFAULT now())")
            for version, sql in migrations:
                if version > found:
                    conn.execute(sql)
                    conn.execute(f"INSERT INTO {SCHEMA}.schema_version(version) VALUES (%s)",
                                 (version,))
    except psycopg.errors.InsufficientPrivilege as e:
        raise SchemaError(
            f"cannot {'create' if found == 0 else 'upgrade'} schema {SCHEMA} "
            f"(version {found} -> {target}): {e.diag.message_primary}; run it once with a role "
            "that owns the database (see docs/SEVERAL_NODES.md)") from None
    finally:
        if not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return found, target
