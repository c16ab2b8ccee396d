"""backend.py opens the directory and grants the configuration names, and names it for `stat`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mailappliance.access.relay import RelayGrants
from mailappliance.users.backend import (
    describe_database,
    open_directory,
    open_grants,
    open_user_store,
)
from mailappliance.users.store import StoreError, UserStore


def test_empty_database_is_the_embedded_sqlite_store(tmp_path):
    store = open_directory("", tmp_path, "", 4)
    try:
        assert isinstance(store, UserStore)
        assert store.maildir_for("joe", "test.com") == tmp_path / "domains/test.com/joe/Maildir"
        assert isinstance(open_grants(store, tmp_path), RelayGrants)
    finally:
        store.close()
    assert describe_database("", tmp_path) == f"sqlite:{tmp_path / 'users.sqlite'}"


def test_a_mailbox_tree_of_its_own_holds_the_maildirs(tmp_path):
    store = open_directory("", tmp_path / "data", tmp_path / "boxes", 4)
    try:
        store.add_domain("test.com")
        user = store.add_user("joe@test.com", "Passw0rd!")
        assert user.maildir == tmp_path / "boxes/test.com/joe/Maildir"
        assert (user.maildir / "new").is_dir()
        store.del_user("joe@test.com")
        assert not (tmp_path / "boxes/test.com/joe").exists()
    finally:
        store.close()


@pytest.mark.parametrize("value", ["mysql://x/y", "users.sqlite", "postgresql:/x"])
def test_a_database_that_is_neither_is_refused(tmp_path, value):
    with pytest.raises(StoreError, match=r"\[users\] database"):
        open_directory(value, tmp_path)


def test_settings_without_the_keys_mean_sqlite(tmp_path):
    settings = SimpleNamespace(data=tmp_path, bcrypt_cost=4)
    store = open_user_store(settings)
    assert isinstance(store, UserStore)
    store.close()


def test_a_postgresql_uri_opens_the_shared_backend_and_its_grants(pg_database, tmp_path):
    from mailappliance.users.pgstore import PgRelayGrants, PgUserStore
    cluster, dbname = pg_database
    settings = SimpleNamespace(data=tmp_path / "data", bcrypt_cost=4, mailboxes=str(tmp_path / "m"),
                               users=SimpleNamespace(database=cluster.uri(dbname)))
    store = open_user_store(settings)
    try:
        assert isinstance(store, PgUserStore)
        assert store.maildir_for("a", "b.example") == tmp_path / "m/b.example/a/Maildir"
        grants = open_grants(store, settings.data)
        assert isinstance(grants, PgRelayGrants) and grants.db is store.db
        assert cluster.password not in describe_database(settings.users.database, tmp_path)
        assert describe_database(settings.users.database, tmp_path) == store.description
    finally:
        store.close()
