"""POP-before-SMTP grants: monotonic expiry, persistence across restarts, bounded size.

Tests taking `make_grants` run against both IRelayGrants backends: the JSON file and
PostgreSQL (shared by the nodes; tests/pg_support.py). `make_grants(clocks, ...)` opens a
new instance on the same backing, as a restarted process or another node would. PostgreSQL
keeps expiry on one clock shared by all nodes; the tests hand it `clocks.mono` (or, across a
restart, `clocks.wall`, as the database's clock goes on while a node restarts)."""

import pytest
from zope.interface.verify import verifyObject

from mailappliance.access.relay import RelayGrants
from mailappliance.users.directory import IRelayGrants


class Clocks:
    def __init__(self):
        self.mono, self.wall = 1000.0, 1_700_000_000.0

    def advance(self, s):
        self.mono += s
        self.wall += s


@pytest.fixture(params=["sqlite", "postgresql"])
def make_grants(request, tmp_path):
    if request.param == "sqlite":
        def make(c, on_change=None, shared="mono"):
            return RelayGrants(tmp_path / "g.json", clock=lambda: c.mono,
                               wallclock=lambda: c.wall, on_change=on_change)
        yield make
        return
    uri = request.getfixturevalue("pg_uri")         # skips (or fails in CI) without PostgreSQL
    from mailappliance.users.pgstore import PgDatabase, PgRelayGrants
    opened = []

    def make(c, on_change=None, shared="mono"):
        db = PgDatabase(uri)
        opened.append(db)
        db.ensure_schema()
        return PgRelayGrants(db, clock=lambda: getattr(c, shared), on_change=on_change)
    yield make
    for db in opened:
        db.close()


def test_both_backends_provide_the_interface(make_grants):
    assert verifyObject(IRelayGrants, make_grants(Clocks()))


def test_grant_expires_on_the_monotonic_clock(make_grants):
    c = Clocks()
    g = make_grants(c)
    g.grant("127.0.0.5", 1800)
    assert g.is_granted("127.0.0.5")
    assert not g.is_granted("127.0.0.6"), "a grant is for that IP only"
    c.mono += 1799
    assert g.is_granted("127.0.0.5")
    c.wall -= 10_000  # a wall-clock jump changes nothing
    assert g.is_granted("127.0.0.5")
    c.mono += 2
    assert not g.is_granted("127.0.0.5")


def test_grants_survive_a_restart_with_their_remaining_time(make_grants):
    c = Clocks()
    g = make_grants(c, shared="wall")
    g.grant("::ffff:192.0.2.1", 600)
    g.grant("192.0.2.2", 60)
    c.advance(100)
    c.mono = 5.0  # a new process: its monotonic clock starts elsewhere
    g2 = make_grants(c, shared="wall")
    assert g2.is_granted("192.0.2.1")
    assert not g2.is_granted("192.0.2.2")
    left = dict(g2.entries())["192.0.2.1"]
    assert 499 <= left <= 500


def test_corrupt_grant_file_is_ignored_and_zero_minutes_grants_nothing(tmp_path):
    (tmp_path / "g.json").write_text("{not json")
    g = RelayGrants(tmp_path / "g.json")
    g.grant("127.0.0.1", 0)
    assert not g.is_granted("127.0.0.1")


def test_expire_reports_and_logs(make_grants):
    c = Clocks()
    events = []
    g = make_grants(c, on_change=lambda e, ip: events.append((e, ip)))
    g.grant("127.0.0.9", 10)
    c.advance(11)
    assert g.expire() == ["127.0.0.9"]
    assert events == [("grant", "127.0.0.9"), ("expire", "127.0.0.9")]


def test_zero_or_negative_seconds_grant_nothing(make_grants):
    g = make_grants(Clocks())
    g.grant("127.0.0.1", 0)
    g.grant("127.0.0.2", -5)
    assert not g.is_granted("127.0.0.1") and not g.is_granted("127.0.0.2")
    assert list(g.entries()) == []


def test_a_grant_on_one_instance_counts_on_another(make_grants):
    """Another process on the same file after a restart, or another node on the database."""
    c = Clocks()
    a = make_grants(c)
    assert not a.is_granted("192.0.2.7")             # remembered as "no grant"
    b = make_grants(c)
    b.grant("192.0.2.7", 60)
    if isinstance(a, RelayGrants):
        a = make_grants(c)                            # the file is read at start-up only
    else:
        a.db.sync()
    assert a.is_granted("192.0.2.7")
    assert [ip for ip, _ in a.entries()] == ["192.0.2.7"]


def test_postgres_grants_are_bounded_at_each_sweep(pg_uri, monkeypatch):
    from mailappliance.users import pgstore
    monkeypatch.setattr(pgstore, "MAX_GRANTS", 3)
    c = Clocks()
    db = pgstore.PgDatabase(pg_uri)
    try:
        db.ensure_schema()
        g = pgstore.PgRelayGrants(db, clock=lambda: c.mono)
        for i in range(5):
            g.grant(f"192.0.2.{i}", 100 + i)           # .0 expires first
        assert sorted(g.expire()) == ["192.0.2.0", "192.0.2.1"]
        assert [ip for ip, _ in g.entries()] == ["192.0.2.2", "192.0.2.3", "192.0.2.4"]
    finally:
        db.close()
