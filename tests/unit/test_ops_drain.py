"""Graceful stop: the drain tells idle sessions to close, lets busy ones finish, bounded in time;
and the root service stops listeners first, then drains, then the rest in reverse order."""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address

from mailappliance import drain as dr
from mailappliance.config import load_settings
from mailappliance.app import Listener
from mailappliance.service import AppService
from mailappliance.testing.app import build_test_app


class Session:
    """A protocol's side of the drain contract: close_now() sends 421 and the connection goes."""

    def __init__(self, drain: dr.Drain, lose_on_close: bool = True) -> None:
        self.closed = 0
        self.lose_on_close = lose_on_close
        self.handle = drain.register(self.close_now)

    def close_now(self) -> None:
        self.closed += 1
        if self.lose_on_close:
            self.handle.done()


def test_idle_sessions_close_at_once_and_the_drain_fires():
    clock = task.Clock()
    d = dr.Drain(clock)
    a, b = Session(d), Session(d)
    fired = d.start()
    assert (a.closed, b.closed) == (1, 1)
    assert fired.called
    assert d.stopping


def test_a_busy_session_finishes_and_closes_when_idle():
    clock = task.Clock()
    d = dr.Drain(clock)
    idle, busy = Session(d), Session(d)
    busy.handle.busy()
    fired = d.start()
    assert idle.closed == 1 and busy.closed == 0
    assert not fired.called
    clock.advance(dr.DRAIN_TIMEOUT - 1)
    busy.handle.idle()                 # its 250 went out: now it is told to close
    assert busy.closed == 1
    assert fired.called
    assert clock.getDelayedCalls() == []


def test_a_transfer_that_does_not_finish_is_closed_at_the_deadline():
    clock = task.Clock()
    d = dr.Drain(clock)
    slow = Session(d)
    slow.handle.busy()
    fired = d.start()
    clock.advance(dr.DRAIN_TIMEOUT)
    assert slow.closed == 1 and fired.called


def test_a_session_that_does_not_go_away_is_given_up_after_the_grace():
    clock = task.Clock()
    d = dr.Drain(clock)
    stuck = Session(d, lose_on_close=False)
    stuck.handle.busy()
    fired = d.start()
    clock.advance(dr.DRAIN_TIMEOUT)
    assert stuck.closed == 1 and not fired.called
    clock.advance(dr.CLOSE_GRACE)
    assert fired.called
    stuck.handle.idle()                # late: close is called only once
    assert stuck.closed == 1


def test_a_session_arriving_during_the_drain_is_closed_at_once():
    clock = task.Clock()
    d = dr.Drain(clock)
    busy = Session(d)
    busy.handle.busy()
    d.start()
    late = Session(d)
    assert late.closed == 1


def test_close_raising_does_not_stop_the_drain():
    clock = task.Clock()
    d = dr.Drain(clock)

    def bad():
        raise RuntimeError("transport gone")
    h = d.register(bad)
    fired = d.start()
    assert h.closing
    h.done()
    assert fired.called


def test_app_service_stops_listeners_then_drains_then_the_rest_in_reverse(tmp_path):
    settings = load_settings(None, {"data": str(tmp_path / "var")}, cwd=tmp_path)
    app = build_test_app(settings=settings)
    order = []

    class Recorder(service.Service):
        def __init__(self, name, wait=None):
            self.name, self.wait = name, wait

        def stopService(self):
            super().stopService()
            order.append(self.name)
            return self.wait

    class FakePort:
        def getHost(self):
            return IPv4Address("TCP", "127.0.0.1", 2525)

        def stopListening(self):
            order.append("listener")

    class FakeEndpoint:
        def listen(self, factory):
            return defer.succeed(FakePort())

    top = AppService(app)
    Recorder("first").setServiceParent(top)
    pending = defer.Deferred()
    Recorder("second", pending).setServiceParent(top)
    listener = Listener("smtp", "tcp:0", FakeEndpoint(), None)
    listener.setServiceParent(top)
    Recorder("third").setServiceParent(top)
    drained = defer.Deferred()

    def drain():
        order.append("drain")
        return drained
    app.stop_hooks.append(drain)
    top.startService()
    done = top.stopService()
    assert order == ["listener", "drain"]
    drained.callback(None)
    assert order == ["listener", "drain", "third", "second"]   # second is still stopping
    pending.callback(None)
    assert order == ["listener", "drain", "third", "second", "first"]
    assert done.called
    app.store.close()


def test_app_service_does_not_wait_forever_for_a_wedged_part(tmp_path):
    from mailappliance.service import STOP_PHASE_TIMEOUT
    settings = load_settings(None, {"data": str(tmp_path / "var")}, cwd=tmp_path)
    app = build_test_app(settings=settings)
    top = AppService(app)
    app.stop_hooks.append(lambda: defer.Deferred())          # never fires
    top.startService()
    done = top.stopService()
    assert not done.called
    app.reactor.advance(STOP_PHASE_TIMEOUT)
    assert done.called
    app.store.close()
