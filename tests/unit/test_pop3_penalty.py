"""The per-IP login penalty (Dovecot's auth penalty numbers) with time passed in."""

from mailappliance.pop3 import penalty as p
from mailappliance.pop3.penalty import LoginPenalty


def test_failures_double_from_2_to_15_seconds():
    t = LoginPenalty()
    now = 1000.0
    delays = []
    for _ in range(6):
        assert t.wait_before_check("192.0.2.1", now) == 0.0   # sequential: answer already waited
        d = t.failed("192.0.2.1", now)
        delays.append(d)
        now += d
    assert delays == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]


def test_a_parallel_check_waits_for_the_last_failure_answer():
    t = LoginPenalty()
    assert t.failed("192.0.2.1", 0.0) == 2.0
    assert t.wait_before_check("192.0.2.1", 0.5) == 1.5
    assert t.wait_before_check("192.0.2.2", 0.5) == 0.0      # other clients are not slowed


def test_success_clears_and_timeout_forgets():
    t = LoginPenalty()
    t.failed("192.0.2.1", 0.0)
    t.failed("192.0.2.1", 2.0)
    t.succeeded("192.0.2.1")
    assert t.steps("192.0.2.1", 3.0) == 0
    t.failed("192.0.2.9", 0.0)
    assert t.steps("192.0.2.9", p.PENALTY_TIMEOUT - 1) == 1
    assert t.steps("192.0.2.9", p.PENALTY_TIMEOUT + 0.1) == 0
    assert t.failed("192.0.2.9", p.PENALTY_TIMEOUT + 1) == 2.0


def test_ipv6_grouped_by_48_and_mapped_v4_normalised():
    t = LoginPenalty()
    t.failed("2001:db8:1:2::1", 0.0)
    assert t.steps("2001:db8:1:ffff::9", 1.0) == 1
    assert t.steps("2001:db8:2::1", 1.0) == 0
    t.failed("::ffff:192.0.2.7", 0.0)
    assert t.steps("192.0.2.7", 1.0) == 1


def test_table_is_bounded():
    t = LoginPenalty(max_tracked=100)
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}", float(i) / 1000)
    assert len(t) == 100
    assert t.steps("10.0.3.231", 1.0) == 1       # the newest is kept
    assert t.steps("10.0.0.0", 1.0) == 0         # the oldest went first


def test_penalty_seconds_table():
    assert [p.penalty_seconds(n) for n in range(6)] == [0.0, 2.0, 4.0, 8.0, 15.0, 15.0]
