"""mailappliance.startup and its hooks in app.py: a start-up error becomes one logged line and
a stop, at each of the three places a start can fail (the real twistd runs are in
tests/integration/test_startup_failures.py)."""

from __future__ import annotations

import errno
import json

import pytest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from mailappliance import startup
from mailappliance.app import Listener, ReadyService
from mailappliance.config import ConfigError
from mailappliance.testing.app import build_test_app

IN_USE = CannotListenError("127.0.0.1", 2525, OSError(errno.EADDRINUSE,
                                                      "Address already in use"))


class Recorder(service.Service):
    def __init__(self, name, events, fail_on_start=None):
        self.name = name
        self.events = events
        self.fail_on_start = fail_on_start

    def startService(self):
        super().startService()
        self.events.append(("start", self.name))
        if self.fail_on_start is not None:
            raise self.fail_on_start

    def stopService(self):
        super().stopService()
        self.events.append(("stop", self.name))


def critical_lines(logs):
    return [e["log_format"].format(**e) for e in logs if e["log_level"].name == "critical"]


def test_an_error_while_starting_is_one_line_a_stop_of_what_started_and_exit_1(tmp_path):
    events = []
    top = service.MultiService()
    for part in [Recorder("pool", events), Recorder("log", events),
                 Recorder("queue", events, fail_on_start=PermissionError(
                     errno.EACCES, "Permission denied", str(tmp_path / "queue"))),
                 Recorder("listener", events)]:
        part.setServiceParent(top)
    guard = startup.StartupGuard(top, tmp_path)
    guard.privilegedStartService()
    with capturedLogs() as logs:
        with pytest.raises(SystemExit) as exit_:
            guard.startService()
    assert exit_.value.code == 1
    assert critical_lines(logs) == [
        f"start-up failed: {tmp_path / 'queue'}: Permission denied"]
    # Started in order up to the failure; the started ones stopped, last first; the listener
    # after it never started.
    assert events == [("start", "pool"), ("start", "log"), ("start", "queue"),
                      ("stop", "queue"), ("stop", "log"), ("stop", "pool")]


def test_the_guard_removes_its_own_pid_file_only(tmp_path):
    import os
    pidfile = tmp_path / "twistd.pid"
    top = service.MultiService()
    Recorder("bad", [], fail_on_start=OSError(errno.ENOSPC, "No space left on device")
             ).setServiceParent(top)
    pidfile.write_text(f"{os.getpid()}\n")
    with pytest.raises(SystemExit):
        startup.StartupGuard(top, tmp_path, str(pidfile)).startService()
    assert not pidfile.exists()
    top2 = service.MultiService()
    Recorder("bad", [], fail_on_start=OSError(errno.ENOSPC, "x")).setServiceParent(top2)
    pidfile.write_text("1\n")
    with pytest.raises(SystemExit):
        startup.StartupGuard(top2, tmp_path, str(pidfile)).startService()
    assert pidfile.exists()


class FailingEndpoint:
    def __init__(self, result: defer.Deferred) -> None:
        self.result = result

    def listen(self, factory):
        return self.result


def test_a_port_in_use_fails_the_privileged_start_at_once():
    listener = Listener("smtp", "tcp:2525:interface=127.0.0.1",
                        FailingEndpoint(defer.fail(IN_USE)), None)
    with pytest.raises(startup.StartupFailed) as e:
        listener.privilegedStartService()
    assert str(e.value) == ("smtp: cannot listen on tcp:2525:interface=127.0.0.1: "
                            "Address already in use")


def test_a_late_listen_failure_and_a_full_disk_stop_the_reactor_with_one_line(tmp_path):
    app = build_test_app(tmp_path / "data")
    late = defer.Deferred()
    listener = Listener("pop3", "systemd:domain=INET:index=0", FailingEndpoint(late), None)
    app.listeners.append(listener)
    listener.privilegedStartService()             # not failed yet: no exception
    ready = ReadyService(app)
    hooks = []
    ready.on_ready.append(hooks.append)
    with capturedLogs() as logs:
        ready.startService()
        late.errback(IN_USE)
    assert critical_lines(logs) == [
        "start-up failed: pop3: cannot listen on systemd:domain=INET:index=0: "
        "Address already in use"]
    assert hooks == []                            # no READY=1
    assert app.reactor.whenRunningHooks or app.reactor.hasStopped
    assert startup._exit_status is None           # not armed outside twistd


def test_a_readiness_file_that_cannot_be_written_leaves_no_tmp(tmp_path, monkeypatch):
    app = build_test_app(tmp_path / "data")
    app.reactor.running = True
    run = app.settings.data / "run"
    run.mkdir(parents=True, exist_ok=True)
    ready = ReadyService(app)
    hooks = []
    ready.on_ready.append(hooks.append)

    def full(self, *a, **kw):
        open(self, "w").close()                   # the file is made, its data does not fit
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(type(run), "write_text", full)
    with capturedLogs() as logs:
        ready.startService()
    assert critical_lines(logs) == [
        f"start-up failed: cannot write {run / 'ready.json.tmp'}: No space left on device"]
    assert not (run / "ready.json.tmp").exists() and not (run / "ready.json").exists()
    assert hooks == [] and app.reactor.hasStopped


def test_ready_writes_the_file_when_all_is_well(tmp_path):
    app = build_test_app(tmp_path / "data")
    ready = ReadyService(app)
    ready.startService()
    info = json.loads((app.settings.data / "run" / "ready.json").read_text())
    assert info["listen"] == {}


@pytest.mark.parametrize("error, line", [
    (ConfigError("tls.key: k.pem does not match the certificate c.pem"),
     "tls.key: k.pem does not match the certificate c.pem"),
    (IN_USE, "cannot listen on 127.0.0.1:2525: Address already in use"),
    (OSError(errno.ENOSPC, "No space left on device", "/d/queue/tmp/1"),
     "/d/queue/tmp/1: No space left on device"),
    (defer.FirstError(Failure(startup.StartupFailed("smtp: cannot listen")), 0),
     "smtp: cannot listen"),
    (RuntimeError("surprise"), "RuntimeError: surprise"),
])
def test_describe_gives_one_line(error, line):
    assert startup.describe(error) == line
    assert "\n" not in startup.describe(Failure(error))


def test_running_thread_pools_are_stopped_so_the_process_can_exit(tmp_path):
    """The original hang: an error after the thread pools started left their (non-daemon)
    threads running, and the process never ended. Real pools here, stopped by the guard."""
    from twisted.python.threadpool import ThreadPool

    from mailappliance.service import ThreadPoolService
    pools = [ThreadPool(1, 2, name="test-a"), ThreadPool(1, 2, name="test-b")]
    top = service.MultiService()
    for pool in pools:
        ThreadPoolService(pool).setServiceParent(top)
    Recorder("log", [], fail_on_start=PermissionError(errno.EACCES, "Permission denied",
                                                      "/d/log")).setServiceParent(top)
    guard = startup.StartupGuard(top, tmp_path)
    with pytest.raises(SystemExit):
        guard.startService()
    for pool in pools:
        assert not pool.started
        assert not any(t.is_alive() for t in pool.threads)
