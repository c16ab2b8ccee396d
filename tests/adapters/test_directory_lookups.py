"""ReactorLookups: the reactor thread never waits on a remote directory, and SQLite stays direct."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from mailappliance.access.relay import RelayGrants
from mailappliance.testing.directory import FakeRemoteDirectory, FakeRemoteGrants
from mailappliance.testing.threads import DeferredThreadPool, ThreadlessReactor
from mailappliance.users.directory import (
    DirectoryUnavailable,
    IRemoteDirectory,
    IRemoteGrants,
)
from mailappliance.users.lookups import ReactorLookups
from mailappliance.users.store import UserStore

PW = "Passw0rd!"


@pytest.fixture
def sqlite(tmp_path):
    store = UserStore(tmp_path, 4)
    store.add_domain("test.com")
    store.add_user("joe@test.com", PW)
    yield store
    store.close()


def make(store, grants):
    pool = DeferredThreadPool()
    return ReactorLookups(store, grants, ThreadlessReactor(), pool), pool


def test_the_fakes_provide_the_remote_interfaces(sqlite):
    assert verifyObject(IRemoteDirectory, FakeRemoteDirectory(sqlite))
    assert verifyObject(IRemoteGrants, FakeRemoteGrants(RelayGrants(None)))


def test_sqlite_answers_directly_without_the_thread_pool(sqlite):
    grants = RelayGrants(None)
    lookups, pool = make(sqlite, grants)
    assert lookups.lookup_recipient("joe@test.com") == "user"
    assert lookups.has_domain("test.com") is True
    assert lookups.grant("192.0.2.1", 60) is None
    assert lookups.is_granted("192.0.2.1") is True
    assert lookups.expire() == []
    assert pool.pending == type(pool.pending)() and pool.calls == 0


def test_a_remote_miss_goes_to_a_thread_and_concurrent_misses_share_it(sqlite):
    remote = FakeRemoteDirectory(sqlite)
    lookups, pool = make(remote, FakeRemoteGrants(RelayGrants(None)))
    first = lookups.lookup_recipient("joe@test.com")
    second = lookups.lookup_recipient("joe@test.com")
    other = lookups.has_domain("example.org")
    assert isinstance(first, Deferred) and isinstance(second, Deferred)
    assert len(pool.pending) == 2, "one query for the two misses of one key"
    assert remote.calls == 0, "nothing ran on the reactor thread"
    pool.run_all()
    got = []
    for d in (first, second, other):
        d.addCallback(got.append)
    assert got == ["user", "user", False]
    assert lookups.lookup_recipient("joe@test.com") == "user", "a hit is answered at once"
    assert lookups.misses == 2 and remote.calls == 2


def test_a_remote_directory_that_is_down_fails_the_deferred_with_an_oserror(sqlite):
    remote = FakeRemoteDirectory(sqlite)
    lookups, pool = make(remote, FakeRemoteGrants(RelayGrants(None)))
    assert lookups.lookup_recipient("joe@test.com") is not None
    pool.run_all()
    remote.down = True
    d = lookups.lookup_recipient("joe@test.com")      # the cache is not trusted either
    assert isinstance(d, Deferred)
    pool.run_all()
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(DirectoryUnavailable)
    assert isinstance(failures[0].value, OSError)
    assert lookups._inflight == {}


def test_remote_grants_are_written_and_read_in_threads(sqlite):
    grants = FakeRemoteGrants(RelayGrants(None))
    lookups, pool = make(FakeRemoteDirectory(sqlite), grants)
    written = lookups.grant("::ffff:192.0.2.5", 60)
    assert isinstance(written, Deferred) and not grants.inner.entries()
    pool.run_all()
    asked = lookups.is_granted("192.0.2.5")
    assert isinstance(asked, Deferred)
    pool.run_all()
    got = []
    asked.addCallback(got.append)
    assert got == [True]
    assert lookups.is_granted("192.0.2.5") is True       # cached now
    swept = lookups.expire()
    assert isinstance(swept, Deferred)
    pool.run_all()
