"""Failing clearly at start-up.

A start-up that cannot work (a data directory the server's user does not own, a port in use,
a certificate that does not match its key, a full disk) ends with one line of ours, exit
status 1, no traceback, its ports closed, no READY=1 to systemd and no run/ready.json (nor
its .tmp). It fails in one of three places, and each ends that way:

1. Building the service tree (`build_or_exit`, from tap.makeService, before twistd starts its
   log): the data directory's owner against ``--uid``, the user store, the instance lock,
   TLS. The line goes to standard error (``mailappliance: start-up failed: ...``); nothing
   listens yet.
2. Starting it (privilegedStartService binds every port as root; startService runs after the
   privilege drop): `StartupGuard`, the service twistd runs, catches the error, logs the line
   (critical: standard output or the journal, and the log file), stops what already started
   (the thread pools, whose threads would keep the process alive) and raises SystemExit(1),
   which twistd lets through: the process ends before its reactor ever runs, and the kernel
   closes the ports it had bound.
3. Waiting for readiness with the reactor running (an endpoint that binds late, the queue's
   first scan, writing run/ready.json): `fail_running` logs the line and stops the reactor,
   which stops every service (ports closed, ready.json removed). twistd exits 0 whenever its
   reactor stops and swallows anything raised inside it, so the status is set at exit instead
   (an atexit hook calling os._exit(1), after twistd has removed its pid file and logged
   "Server Shut Down."). Only a tree built by `build_or_exit` (a real twistd run) arms this.

A full disk at start is a start-up failure like the others (exit 1, the file and "No space
left on device"); a disk that fills while the server runs gets 4xx replies instead, and the
server keeps serving what it can.
"""

from __future__ import annotations

import atexit
import os
import pwd
import sys
from pathlib import Path

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance import datadir
from mailappliance.config import ConfigError

EXIT_STARTUP_FAILED = 1

log = Logger(namespace="mailappliance.startup")


class StartupFailed(Exception):
    """A start-up step that cannot work; str() is the one line (without the prefix)."""


def listen_error(exc: BaseException) -> str:
    """What the kernel said about a listen: `Address already in use`."""
    if isinstance(exc, CannotListenError):
        err = exc.socketError
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        return str(err)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def describe(exc: BaseException | Failure, data: Path | None = None) -> str:
    """The one line for any start-up error, however deep it came from."""
    while True:
        if isinstance(exc, Failure):
            exc = exc.value
        elif isinstance(exc, defer.FirstError):
            exc = exc.subFailure
        else:
            break
    if isinstance(exc, (StartupFailed, ConfigError)):
        return str(exc)
    if isinstance(exc, CannotListenError):
        where = f"{exc.interface or '*'}:{exc.port}"
        return f"cannot listen on {where}: {listen_error(exc)}"
    store = Path(data) / datadir.STORE_FILES[0] if data is not None else None
    return datadir.describe(exc, store)


# --- 1. building ---------------------------------------------------------------------------------

_armed = False


def _say(line: str) -> None:
    sys.stderr.write(f"mailappliance: {line}\n")
    sys.stderr.flush()


def prepare_data_directory(data: Path, uid: int | None, gid: int | None) -> None:
    """Before anything is built: with ``--uid`` (started as root), refuse a data directory of
    another owner, and make a missing one (mode 0700) for that user; else make a missing one
    for ourselves."""
    if uid is not None and uid != 0 and os.geteuid() == 0:
        if gid is None:            # twistd's own rule: the user's primary group
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = os.getegid()
        problem = datadir.owner_problem(data, uid, gid)
        if problem is not None:
            raise StartupFailed(problem)
        datadir.make_dir(data, owner=(uid, gid))
    else:
        datadir.make_dir(data)


def build_or_exit(settings, make_service, twistd_options=None) -> service.IService:
    """`make_service(settings)` for twistd: the tree wrapped in a StartupGuard, or one line on
    standard error and SystemExit(1). `twistd_options` is twistd's own option dict (--uid,
    --gid, --pidfile), the parent of the plugin's options."""
    global _armed
    opts = twistd_options if twistd_options is not None else {}
    try:
        prepare_data_directory(settings.data, opts.get("uid"), opts.get("gid"))
        top = make_service(settings)
    except ConfigError as e:
        _say(str(e))
        raise SystemExit(EXIT_STARTUP_FAILED) from None
    except Exception as e:
        _say(f"start-up failed: {describe(e, settings.data)}")
        raise SystemExit(EXIT_STARTUP_FAILED) from None
    _armed = True
    return StartupGuard(top, settings.data, opts.get("pidfile") or None)


# --- 2. starting ---------------------------------------------------------------------------------

class StartupGuard(service.MultiService):
    """The service twistd runs: the tree as its one child. An error while the tree starts
    (binding as root, or starting after the privilege drop) becomes one logged line, what
    already started is stopped, and SystemExit(1) ends the process."""

    def __init__(self, top: service.IService, data: Path | None = None,
                 pidfile: str | None = None) -> None:
        super().__init__()
        self.top = top
        self.data = data
        self.pidfile = pidfile
        top.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            self._abort(e)

    def startService(self) -> None:
        try:
            super().startService()
        except Exception as e:
            self._abort(e)

    def _abort(self, exc: BaseException) -> None:
        log.critical("start-up failed: {why}", why=describe(exc, self.data))
        # Stop what started, last first, without the reactor (it never ran): the thread pools
        # join their threads here, the log writes what it holds. Deferreds are not waited for.
        for child in reversed(list(_walk(self.top))):
            if child.running:
                try:
                    child.stopService()
                except Exception:
                    pass
        self._remove_pidfile()
        raise SystemExit(EXIT_STARTUP_FAILED)

    def _remove_pidfile(self) -> None:
        # twistd wrote it before starting the tree and removes it only on a normal stop.
        if not self.pidfile:
            return
        try:
            with open(self.pidfile) as f:
                if int(f.read().strip() or 0) != os.getpid():
                    return
            os.unlink(self.pidfile)
        except (OSError, ValueError):
            pass


def _walk(svc):
    """The services under `svc` in start order (parents before their children)."""
    for child in svc:
        yield child
        if isinstance(child, service.MultiService):
            yield from _walk(child)


# --- 3. running ----------------------------------------------------------------------------------

_exit_status: int | None = None


def _exit_at_end() -> None:
    if _exit_status is None:
        return
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(_exit_status)


def fail_running(reactor, exc: BaseException | Failure, data: Path | None = None) -> None:
    """A readiness condition failed with the reactor running (or about to run): one line,
    stop, and (under twistd) exit status 1."""
    global _exit_status
    log.critical("start-up failed: {why}", why=describe(exc, data))
    if _armed and _exit_status is None:
        _exit_status = EXIT_STARTUP_FAILED
        atexit.register(_exit_at_end)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
