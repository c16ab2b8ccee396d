"""Open the user directory and roaming grants the configuration names (DESIGN.md 3 and 6).

`[users] database = ""` keeps the embedded SQLite store at data/users.sqlite and the grants in
data/relay-grants.json (one node, nothing changes); a libpq URI ("postgresql://...") opens
the shared PostgreSQL backend, which creates or upgrades its schema on the way. `mailboxes`
("" = data/domains) is the Maildir tree, shared by the nodes of a site.

The PostgreSQL driver is imported only when a URI asks for it, so a single node needs no
psycopg installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mailappliance.access.relay import RelayGrants
from mailappliance.users import passwords
from mailappliance.users.directory import IRelayGrants, IRemoteDirectory, IUserDirectory
from mailappliance.users.store import StoreError, UserStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(database: str) -> bool:
    return database.startswith(POSTGRES_SCHEMES)


def describe_database(database: str, data: Path | str) -> str:
    """What `stat` and `check` print: the SQLite file, or the URI without its password."""
    if not database:
        return f"sqlite:{Path(data) / 'users.sqlite'}"
    from mailappliance.users.pgstore import describe
    return describe(database)


def mailbox_root(data: Path | str, mailboxes: str | Path | None) -> Path:
    return Path(mailboxes) if mailboxes else Path(data) / "domains"


def open_directory(database: str, data: Path | str, mailboxes: str | Path | None = None,
                   bcrypt_cost: int = passwords.DEFAULT_COST, *,
                   on_event: Callable[[str, str], None] | None = None,
                   start: bool = True) -> IUserDirectory:
    """The IUserDirectory for `database` ("" or a postgresql:// URI).

    Raises StoreError for a value that is neither, pgschema.SchemaError for a schema it cannot
    use, DirectoryUnavailable (an OSError) for a database it cannot reach. `start=False` (the
    server, before twistd forks): PostgreSQL's pool and watcher threads start later, at
    `store.db.start()` or the first lookup.
    """
    if not database:
        store = UserStore(data, bcrypt_cost)
        root = mailbox_root(data, mailboxes)
        if root != store.domains_dir:
            # UserStore keeps every Maildir path under its domains_dir.
            root.mkdir(parents=True, exist_ok=True)
            store.domains_dir = root
        return store
    if not is_postgres(database):
        raise StoreError(f"[users] database: {database[:40]!r} is neither empty (SQLite) "
                         "nor a postgresql:// URI")
    from mailappliance.users.pgstore import PgUserStore
    return PgUserStore(database, mailbox_root(data, mailboxes), bcrypt_cost, on_event=on_event,
                       start=start)


def open_user_store(settings, *, on_event: Callable[[str, str], None] | None = None,
                    start: bool = True) -> IUserDirectory:
    """open_directory from Settings: `settings.users.database` and `settings.mailboxes` (both
    "" when the configuration schema does not have them)."""
    users = getattr(settings, "users", None)
    database = getattr(users, "database", "") or ""
    return open_directory(database, settings.data, getattr(settings, "mailboxes", "") or "",
                          settings.bcrypt_cost, on_event=on_event, start=start)


def open_grants(store: IUserDirectory, data: Path | str,
                on_change: Callable[[str, str], None] | None = None,
                clock: Callable[[], float] | None = None) -> IRelayGrants:
    """The grants beside `store`: the same database for PostgreSQL, else the JSON file.
    `clock`: the JSON file's (monotonic by default; tests give the reactor's); the database
    keeps its own, shared by the nodes."""
    if IRemoteDirectory.providedBy(store):
        from mailappliance.users.pgstore import PgRelayGrants
        return PgRelayGrants(store.db, on_change=on_change)
    if clock is None:
        return RelayGrants(Path(data) / "relay-grants.json", on_change=on_change)
    return RelayGrants(Path(data) / "relay-grants.json", clock=clock, on_change=on_change)
