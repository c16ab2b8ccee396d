"""deadline.py: per-request deadlines and session lifetimes, time passed in."""

from mailappliance.deadline import MIN_DATA_RATE, Deadline


def test_bytes_earn_nothing_a_complete_request_earns_the_timeout():
    d = Deadline(30, now=0.0, lifetime=3600)
    assert not d.expired(29.9) and d.expired(30.0)
    d.request_done(20.0)
    assert d.remaining(20.0) == 30.0 and d.expired(50.0)
    d.request_done(40.0, timeout=10)                      # a reload's new timeout
    assert d.expired(50.0) and not d.expired(49.9)


def test_content_earns_time_at_the_minimum_rate_capped_at_the_timeout():
    d = Deadline(30, now=0.0, lifetime=3600)
    d.moved(1.0, MIN_DATA_RATE * 10)                      # 10 s more
    assert d.expires == 31.0                              # capped at now + 30
    for t in range(2, 200):                              # keeps moving at the rate: alive
        d.moved(float(t), MIN_DATA_RATE)
    assert not d.expired(199.0)
    slow = Deadline(30, now=0.0, lifetime=3600)
    t = 0.0
    while not slow.expired(t):                            # a quarter of the rate: cut off
        t += 1.0
        slow.moved(t, MIN_DATA_RATE // 4)
    assert 39.0 <= t <= 41.0                              # 30 s + 30/4 s earned, about


def test_lifetime_ends_a_busy_session():
    d = Deadline(30, now=100.0, lifetime=60)
    for t in range(110, 160, 10):
        d.request_done(float(t))
        assert not d.expired(float(t))
    assert d.remaining(155.0) == 5.0
    assert d.expired(160.0) and d.over_lifetime(160.0)
