"""mailappliance/batching.py: one trip at a time, everything that waited in the next one."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailappliance.batching import Batcher


class Trips:
    """A `run` whose Deferreds the test fires."""

    def __init__(self):
        self.trips: list[tuple[list, defer.Deferred]] = []

    def __call__(self, items):
        d = defer.Deferred()
        self.trips.append((list(items), d))
        return d


def outcomes(ds):
    got = []
    for d in ds:
        d.addBoth(got.append)
    return got


def test_items_arriving_during_a_trip_go_together_in_the_next():
    run = Trips()
    b = Batcher(run, max_batch=3)
    first = b.submit("a")
    rest = [b.submit(x) for x in "bcde"]
    assert [items for items, _ in run.trips] == [["a"]]
    run.trips[0][1].callback(["A"])
    assert first.result == "A"
    assert [items for items, _ in run.trips] == [["a"], ["b", "c", "d"]]   # max_batch 3
    run.trips[1][1].callback(["B", "C", "D"])
    assert [items for items, _ in run.trips][-1] == ["e"]
    run.trips[2][1].callback(["E"])
    assert [d.result for d in rest] == ["B", "C", "D", "E"] and not b.running


def test_an_item_that_failed_fails_alone_and_a_failed_trip_fails_all():
    run = Trips()
    b = Batcher(run)
    b.submit(0).addBoth(lambda r: None)
    ds = [b.submit(i) for i in range(3)]
    got = outcomes(ds)
    run.trips[0][1].callback([None])
    run.trips[1][1].callback([1, ValueError("bad"), 3])
    assert got[0] == 1 and got[2] == 3 and got[1].check(ValueError)
    more = [b.submit(i) for i in range(2)]
    got = outcomes(more)
    run.trips[2][1].errback(OSError("disk"))
    assert all(f.check(OSError) for f in got)


def test_what_the_callbacks_submit_goes_into_the_next_batch():
    order = []
    run = Trips()
    b = Batcher(run)
    b.submit("x").addCallback(lambda r: (order.append(r), b.submit("y")))
    run.trips[0][1].callback(["X"])
    assert order == ["X"]
    assert [items for items, _ in run.trips] == [["x"], ["y"]]


def test_no_limit_takes_everything_waiting():
    run = Trips()
    b = Batcher(run, max_batch=None)
    b.submit(0)
    for i in range(1, 500):
        b.submit(i)
    run.trips[0][1].callback([None])
    assert len(run.trips[1][0]) == 499


# -- the gathering window ---------------------------------------------------------------------

def test_items_arriving_within_the_window_go_in_one_trip():
    clock, run = Clock(), Trips()
    b = Batcher(run, max_batch=8, window=0.010, clock=clock)
    ds = [b.submit("a")]
    assert run.trips == [] and b.gathering
    clock.advance(0.004)
    ds.append(b.submit("b"))
    clock.advance(0.004)
    ds.append(b.submit("c"))
    assert run.trips == []
    clock.advance(0.002)                       # 10 ms after the first item: the window ends
    assert [items for items, _ in run.trips] == [["a", "b", "c"]] and not b.gathering
    run.trips[0][1].callback(["A", "B", "C"])
    assert [d.result for d in ds] == ["A", "B", "C"]


def test_the_window_never_delays_beyond_its_bound():
    clock, run = Clock(), Trips()
    window = 1 / 128                           # binary fractions: exact sums on the fake clock
    b = Batcher(run, max_batch=8, window=window, clock=clock)
    b.submit("a")
    clock.advance(window - 1 / 1024)
    assert run.trips == []
    b.submit("b")                              # a late arrival does not extend the window
    clock.advance(1 / 1024)
    assert [items for items, _ in run.trips] == [["a", "b"]]
    assert clock.getDelayedCalls() == []


def test_a_full_batch_goes_at_once_without_waiting():
    clock, run = Clock(), Trips()
    b = Batcher(run, max_batch=3, window=0.010, clock=clock)
    b.submit(1)
    b.submit(2)
    assert run.trips == []
    b.submit(3)
    assert [items for items, _ in run.trips] == [[1, 2, 3]]
    assert clock.getDelayedCalls() == [] and not b.gathering   # the timer is cancelled


def test_items_arriving_during_a_trip_go_right_after_it_without_a_window():
    clock, run = Clock(), Trips()
    b = Batcher(run, max_batch=8, window=0.010, clock=clock)
    b.submit(1)
    clock.advance(0.010)
    b.submit(2)
    b.submit(3)
    run.trips[0][1].callback([None])
    assert [items for items, _ in run.trips] == [[1], [2, 3]]   # no second wait under load
    run.trips[1][1].callback([None, None])
    b.submit(4)                                # idle again: the next item gathers
    assert len(run.trips) == 2 and b.gathering


def test_flush_starts_the_waiting_items_now():
    clock, run = Clock(), Trips()
    b = Batcher(run, max_batch=None, window=0.010, clock=clock)
    b.flush()                                  # nothing waiting: nothing happens
    assert run.trips == []
    b.submit("a")
    b.submit("b")
    b.flush()
    assert [items for items, _ in run.trips] == [["a", "b"]]
    assert clock.getDelayedCalls() == [] and not b.gathering
    b.submit("c")
    b.flush()                                  # a trip is running: "c" goes right after it
    assert len(run.trips) == 1
    run.trips[0][1].callback([None, None])
    assert [items for items, _ in run.trips][-1] == ["c"]


def test_a_window_needs_a_clock():
    with pytest.raises(ValueError):
        Batcher(Trips(), window=0.010)
