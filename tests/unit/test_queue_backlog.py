"""queue/backlog.py: the compact store of messages outside the manager's window (pure: times
come in as arguments)."""

from __future__ import annotations

import random

from mailappliance.queue.backlog import BUCKET_SECONDS, UNKNOWN, Backlog

T0 = 1_700_000_040.0          # a bucket boundary (a multiple of 60)


def test_due_entries_come_out_first_in_first_out_and_later_ones_at_their_bucket():
    b = Backlog()
    b.add(1, T0 + 500, T0, now=T0)
    b.add_due(2, T0, T0)
    b.add(3, T0 - 5, T0, now=T0)           # already due: joins the due list
    b.add(4, T0 + 130, T0, now=T0)
    assert len(b) == 4
    assert [e.qid for e in b.take(T0, 10)] == [2, 3]
    assert b.next_time() == T0 + 120       # 4's bucket [T0+120, T0+180)
    assert b.take(T0 + 119, 10) == []
    [e] = b.take(T0 + 120, 10)
    assert (e.qid, e.next_try) == (4, T0 + 130)   # its exact time goes with it
    assert [e.qid for e in b.take(T0 + 500, 10)] == [1]
    assert len(b) == 0 and b.next_time() is None


def test_take_hands_out_at_most_n_and_keeps_the_rest_in_order():
    b = Backlog()
    for q in range(1, 11):
        b.add_due(q, T0, T0)
    assert [e.qid for e in b.take(T0, 3)] == [1, 2, 3]
    assert [e.qid for e in b.take(T0, 3)] == [4, 5, 6]
    assert b.due_count() == 4 and len(b) == 4
    assert [e.qid for e in b.take(T0, 100)] == [7, 8, 9, 10]


def test_a_destination_that_comes_back_releases_all_its_entries_at_once():
    b = Backlog()
    dead = b.dest_id("dead.example")
    other = b.dest_id("other.example")
    for q in range(1, 6):
        b.add(q, T0 + q * 1000, T0, dead, now=T0)
    b.add(50, T0 + 3000, T0, other, now=T0)
    assert b.count_dest(dead) == 5
    assert b.release(dead, T0 + 10) == 5
    due = b.take(T0 + 10, 100)
    assert sorted(e.qid for e in due) == [1, 2, 3, 4, 5]
    assert {e.next_try for e in due} == {T0 + 10}, "due now, not at their old times"
    assert len(b) == 1 and b.count_dest(other) == 1
    assert b.release(UNKNOWN, T0) == 0


def test_flush_makes_everything_due():
    b = Backlog()
    for q in range(1, 4):
        b.add(q, T0 + q * 10_000, T0, now=T0)
    assert b.release_all(T0) == 3
    assert sorted(e.qid for e in b.take(T0, 10)) == [1, 2, 3]


def test_probe_takes_one_entry_of_a_destination():
    b = Backlog()
    d = b.dest_id("x.example")
    b.add(7, T0 + 4000, T0, d, now=T0)
    b.add(8, T0 + 9000, T0, d, now=T0)
    first = b.probe(d)
    assert first.qid == 7 and len(b) == 1
    assert b.probe(b.dest_id("y.example")) is None


def test_remove_known_and_oldest_birth():
    b = Backlog()
    b.add(1, T0 + 900, T0 - 50, now=T0)
    b.add(2, T0 + 900, T0 - 10, now=T0)
    b.add_due(3, T0, T0 - 99)
    assert b.oldest_birth() == T0 - 99
    assert b.known({1, 3, 42}) == {1, 3}
    assert b.remove(3) and not b.remove(3)
    assert b.oldest_birth() == T0 - 50
    assert b.remove(1)
    assert b.oldest_birth() == T0 - 10 and len(b) == 1
    assert b.remove(2) and b.next_time() is None and b.oldest_birth() is None


def test_unknown_entries_can_be_taken_out_to_be_read_and_put_back():
    b = Backlog()
    d = b.dest_id("a.example")
    b.add(1, T0 + 600, T0, UNKNOWN, now=T0)
    b.add(2, T0 + 600, T0, d, now=T0)
    [e] = b.take_unknown()
    assert e.qid == 1 and len(b) == 1
    b.add(e.qid, e.next_try, e.birth, e.dest, now=T0)
    assert len(b) == 2


def test_a_million_entries_cost_about_24_bytes_each():
    """The point of the backlog: a queue of a million costs tens of MB, not gigabytes."""
    b = Backlog()
    d = b.dest_id("dead.example")
    for q in range(1_000_000):
        b.add(q + 1, T0 + (q % 10_080 + 1) * BUCKET_SECONDS, T0, d, now=T0)
    assert len(b) == 1_000_000
    assert b.memory() < 40 * 1024 * 1024
    assert b.release(d, T0) == 1_000_000
    assert len(b.take(T0, 2_000_000)) == 1_000_000


def test_the_due_list_drops_its_consumed_head():
    b = Backlog()
    for q in range(1, 20_001):
        b.add_due(q, T0, T0)
    for _ in range(150):
        b.take(T0, 100)
    assert b.due_count() == 5_000
    assert b._head < 5_000, "the consumed head was dropped"
    assert [e.qid for e in b.take(T0, 2)] == [15_001, 15_002]


def test_due_entries_count_and_are_known_until_taken():
    b = Backlog()
    d = b.dest_id("x.example")
    for q in range(1, 6):
        b.add_due(q, T0, T0, d)
    b.add(9, T0 + 600, T0, d, now=T0)
    assert b.count_dest(d) == 6 and b.known({1, 5, 9, 7}) == {1, 5, 9}
    b.take(T0, 2)
    assert b.count_dest(d) == 4 and b.known({1, 2, 3}) == {3}


def test_oldest_birth_stays_exact_through_every_change():
    """The oldest birth is remembered per block (no pass over a million entries per metrics
    scrape); every operation that removes or moves entries keeps the answer exact."""
    rng = random.Random(7)
    b = Backlog()
    alive: dict[int, float] = {}
    dests = [b.dest_id(f"d{k}.test") for k in range(3)]
    now = T0
    for step in range(3000):
        op = rng.random()
        if op < 0.45:
            qid = step + 1
            birth = T0 - rng.uniform(0, 10_000)
            b.add(qid, now + rng.uniform(-100, 3000), birth, rng.choice(dests + [UNKNOWN]),
                  now=now)
            alive[qid] = birth
        elif op < 0.6:
            for e in b.take(now, rng.randint(1, 20)):
                del alive[e.qid]
        elif op < 0.7 and alive:
            qid = rng.choice(list(alive))
            assert b.remove(qid)
            del alive[qid]
        elif op < 0.75:
            e = b.probe(rng.choice(dests))
            if e is not None:
                del alive[e.qid]
        elif op < 0.8:
            b.release(rng.choice(dests), now)
        elif op < 0.82:
            for e in b.take_unknown():
                b.add(e.qid, e.next_try, e.birth, UNKNOWN, now=now)
        else:
            now += rng.uniform(0, 120)
        assert b.oldest_birth() == min(alive.values(), default=None), step
        assert len(b) == len(alive)
