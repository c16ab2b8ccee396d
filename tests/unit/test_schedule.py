"""queue/schedule.py: qmail-send's nextretry and the queue lifetime."""

from math import isqrt

from hypothesis import given, strategies as st

from mailappliance.queue.schedule import (
    CHANSKIP, DEFAULT_LIFETIME, LOCAL, REMOTE, is_dying, next_attempt, nextretry)

B = 1_000_000_000


def test_first_retries_follow_qmail_chanskip():
    # right after the first attempt: (0 + 10)^2 = 100 s local, (0 + 20)^2 = 400 s remote
    assert nextretry(B, B, LOCAL) == B + 100
    assert nextretry(B, B, REMOTE) == B + 400
    # at the first retry: isqrt(100) = 10 -> (10 + 10)^2 = 400
    assert nextretry(B, B + 100, LOCAL) == B + 400
    assert nextretry(B, B + 400, REMOTE) == B + 1600


def test_local_series_matches_qmail():
    t, series = B, []
    for _ in range(5):
        t = nextretry(B, t, LOCAL)
        series.append(t - B)
    assert series == [100, 400, 900, 1600, 2500]


def test_birth_in_the_future_counts_as_zero_age():
    assert nextretry(B + 50, B, REMOTE) == B + 50 + 400


@given(age=st.integers(0, 10 * DEFAULT_LIFETIME), ch=st.sampled_from([LOCAL, REMOTE]))
def test_formula_and_progress(age, ch):
    r = nextretry(B, B + age, ch)
    assert r == B + (isqrt(age) + CHANSKIP[ch]) ** 2
    assert r > B + age                     # always strictly later than now


def test_lifetime_gives_one_last_attempt_at_the_end():
    life = DEFAULT_LIFETIME
    now = B + life - 10
    assert next_attempt(B, now, REMOTE, life) == B + life
    assert not is_dying(B, now, life)
    assert is_dying(B, B + life, life)


def test_number_of_attempts_in_a_week_is_bounded_like_qmail():
    """About sqrt(604800)/20 ~ 39 remote attempts and ~77 local ones in a week."""
    for ch, lo, hi in ((REMOTE, 30, 45), (LOCAL, 65, 85)):
        t, n = float(B), 1
        while not is_dying(B, t, DEFAULT_LIFETIME):
            t = next_attempt(B, t, ch, DEFAULT_LIFETIME)
            n += 1
        assert lo <= n <= hi, (ch, n)
