"""mailappliance/batching.py: one trip at a time, everything that waited in the next one."""

from __future__ import annotations

from twisted.internet import defer

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
