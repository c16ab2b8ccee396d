"""NotifyService with a Clock and a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.application import service
from twisted.internet import task

from mailappliance import notify


class FakeReady:
    """service.ReadyService's side of the hook: the list it calls with the App when ready."""

    def __init__(self):
        self.on_ready = []


class Reactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.triggers = {}

    def addSystemEventTrigger(self, phase, event, f, *a):
        key = object()
        self.triggers[key] = (phase, event, f)
        return key

    def removeSystemEventTrigger(self, key):
        del self.triggers[key]


class App:
    """What the READY=1 hook reads of the App: its listeners (none here)."""

    listeners = []


@pytest.fixture
def systemd(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setblocking(False)
    yield path, s
    s.close()


def received(s) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_watchdog_and_stopping_reach_the_socket(systemd):
    path, sock = systemd
    reactor = Reactor()
    parent = service.MultiService()
    ready = FakeReady()
    svc = notify.NotifyService(ready, reactor,
                               env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    svc.setServiceParent(parent)
    parent.startService()
    assert received(sock) == ["WATCHDOG=1"]          # first ping at start
    [hook] = ready.on_ready
    hook(App())
    [ready] = received(sock)
    assert ready.startswith(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=ready")
    reactor.advance(1.0)                             # half of WATCHDOG_USEC
    reactor.advance(1.0)
    assert received(sock) == ["WATCHDOG=1", "WATCHDOG=1"]
    [(phase, event, stopping)] = reactor.triggers.values()
    assert (phase, event) == ("before", "shutdown")
    stopping()
    parent.stopService()
    assert received(sock) == ["STOPPING=1\nSTATUS=stopping"]   # once, not twice
    reactor.advance(10)
    assert received(sock) == []                      # pings stopped with the service
    assert svc.pings == 3


def test_without_notify_socket_nothing_is_scheduled():
    reactor = Reactor()
    parent = service.MultiService()
    svc = notify.NotifyService(FakeReady(), reactor, env={"WATCHDOG_USEC": "2000000"})
    svc.setServiceParent(parent)
    parent.startService()
    assert reactor.getDelayedCalls() == [] and reactor.triggers == {}
    parent.stopService()
