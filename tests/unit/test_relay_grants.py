"""POP-before-SMTP grants: monotonic expiry, persistence across restarts, bounded size."""

from mailappliance.access.relay import RelayGrants


class Clocks:
    def __init__(self):
        self.mono, self.wall = 1000.0, 1_700_000_000.0

    def advance(self, s):
        self.mono += s
        self.wall += s


def test_grant_expires_on_the_monotonic_clock(tmp_path):
    c = Clocks()
    g = RelayGrants(tmp_path / "g.json", clock=lambda: c.mono, wallclock=lambda: c.wall)
    g.grant("127.0.0.5", 1800)
    assert g.is_granted("127.0.0.5")
    assert not g.is_granted("127.0.0.6"), "a grant is for that IP only"
    c.mono += 1799
    assert g.is_granted("127.0.0.5")
    c.wall -= 10_000  # a wall-clock jump changes nothing
    assert g.is_granted("127.0.0.5")
    c.mono += 2
    assert not g.is_granted("127.0.0.5")


def test_grants_survive_a_restart_with_their_remaining_time(tmp_path):
    c = Clocks()
    g = RelayGrants(tmp_path / "g.json", clock=lambda: c.mono, wallclock=lambda: c.wall)
    g.grant("::ffff:192.0.2.1", 600)
    g.grant("192.0.2.2", 60)
    c.advance(100)
    c.mono = 5.0  # a new process: its monotonic clock starts elsewhere
    g2 = RelayGrants(tmp_path / "g.json", clock=lambda: c.mono, wallclock=lambda: c.wall)
    assert g2.is_granted("192.0.2.1")
    assert not g2.is_granted("192.0.2.2")
    left = dict(g2.entries())["192.0.2.1"]
    assert 499 <= left <= 500


def test_corrupt_grant_file_is_ignored_and_zero_minutes_grants_nothing(tmp_path):
    (tmp_path / "g.json").write_text("{not json")
    g = RelayGrants(tmp_path / "g.json")
    g.grant("127.0.0.1", 0)
    assert not g.is_granted("127.0.0.1")


def test_expire_reports_and_logs(tmp_path):
    c = Clocks()
    events = []
    g = RelayGrants(tmp_path / "g.json", clock=lambda: c.mono, wallclock=lambda: c.wall,
                    on_change=lambda e, ip: events.append((e, ip)))
    g.grant("127.0.0.9", 10)
    c.advance(11)
    assert g.expire() == ["127.0.0.9"]
    assert events == [("grant", "127.0.0.9"), ("expire", "127.0.0.9")]
