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


# --- turns: one check per address at a time (docs/LIMITS.md) ------------------------------------

def run_guessers(connections: int, seconds: float, check_time: float = 0.25) -> list[float]:
    """`connections` clients from one address, each guessing again as soon as its previous
    failure is answered, against the core alone (a simulated clock, no sockets). Returns the
    times at which password checks started."""
    import heapq
    t = LoginPenalty()
    ip = "192.0.2.50"
    starts: list[float] = []
    events: list[tuple[float, int, str, int]] = []       # (time, seq, what, connection)
    seq = 0

    def push(when, what, conn):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (when, seq, what, conn))

    for c in range(connections):
        push(0.0, "ask", c)
    while events:
        now, _, what, c = heapq.heappop(events)
        if now > seconds:
            break
        if what == "ask":
            wait = t.begin_check(ip, now, c)
            if wait is not None:
                push(now + wait, "check", c)
        elif what == "check":
            starts.append(now)
            push(now + check_time, "done", c)
        elif what == "done":
            delay, nxt = t.end_check(ip, now, False)
            push(now + delay, "ask", c)                  # answered after delay: guesses again
            if nxt is not None:
                push(now + nxt[1], "check", nxt[0])
    return starts


def test_parallel_connections_get_the_checks_of_one():
    one = run_guessers(1, 120.0)
    ten = run_guessers(10, 120.0)
    fifty = run_guessers(50, 120.0)
    assert len(ten) <= len(one) + 1 and len(fifty) <= len(one) + 1
    assert len([s for s in ten if s < 20.0]) <= 4        # 0, 2.25, 6.5, 14.75
    # From the fourth failure on, one check per 15 s (and the check time) per address.
    later = [s for s in fifty if s >= 60.0]
    assert all(b - a >= 15.0 for a, b in zip(later, later[1:]))
    assert all(b > a for a, b in zip(ten, ten[1:]))       # never two at once


def test_turns_queue_in_order_and_hand_over_on_cancel():
    t = LoginPenalty()
    ip = "192.0.2.60"
    assert t.begin_check(ip, 0.0, "a") == 0.0
    assert t.begin_check(ip, 0.1, "b") is None
    assert t.begin_check(ip, 0.2, "c") is None
    assert t.begin_check("192.0.2.61", 0.2, "x") == 0.0   # other addresses are not queued
    assert t.waiting(ip) == 2
    assert t.cancel(ip, 0.3, "b") is None                  # b's connection went away
    delay, nxt = t.end_check(ip, 1.0, False)
    assert delay == 2.0 and nxt == ("c", 2.0)             # c waits out a's penalty
    assert t.cancel(ip, 1.5, "c") is None                  # the holder abandons: nobody left
    assert t.begin_check(ip, 1.6, "d") == 1.4              # the penalty still holds
    delay, nxt = t.end_check(ip, 3.0, True)
    assert delay == 0.0 and nxt is None and len(t) == 1    # success clears the address


def test_store_failure_passes_the_turn_without_penalty():
    t = LoginPenalty()
    ip = "192.0.2.70"
    assert t.begin_check(ip, 0.0, "a") == 0.0
    assert t.begin_check(ip, 0.0, "b") is None
    assert t.end_check(ip, 0.5, None) == (0.0, ("b", 0.0))
    assert t.steps(ip, 0.5) == 0


def test_busy_addresses_are_not_evicted():
    t = LoginPenalty(max_tracked=10)
    assert t.begin_check("10.9.9.9", 0.0, "a") == 0.0
    assert t.begin_check("10.9.9.9", 0.0, "b") is None
    for i in range(100):
        t.failed(f"10.0.0.{i}", 1.0 + i)
    assert len(t) == 10 and t.waiting("10.9.9.9") == 1
    assert t.end_check("10.9.9.9", 200.0, False) == (2.0, ("b", 2.0))
