"""The inject socket (`[listen] inject`): any local user's `mailappliance-sendmail` hands its
message to the running server here, like Postfix's postdrop + pickup.

- The socket is a unix socket made mode 0666 (like /usr/sbin/sendmail, open to every local
  user), with Twisted's stale-socket lock; config.py accepts only unix: endpoints.
- The caller's uid comes from the socket's peer credentials (SO_PEERCRED), never from the
  request; its login name is looked up in the thread pool (NSS may be slow). Both go into the
  `Received:` line and the envelope's origin, so the message says who injected it.
- The message streams into the queue's one door (queue/inject.py) as it arrives: the header
  block (at most core.MAX_HEAD octets) is held while the server adds its headers, the body is
  passed on with the SMTP listener's back-pressure. "0 queued" is sent only after the commit.
- Bounds: MAX_CONNECTIONS at once (one more gets "75 busy" and the client retries),
  databytes per message (refused before any byte of it is read), REQUEST_TIMEOUT for a whole
  request, the line limits of core.py.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import socket
import struct
import time
from pathlib import Path

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from mailappliance import stats as stats_mod
from mailappliance.descriptors import INJECT_SESSIONS
from mailappliance.enddata import HeldMessage
from mailappliance.envelope import check_envelope
from mailappliance.pickup import core
from mailappliance.queue.inject import QueueWriteError

# Injections at once: descriptors.INJECT_SESSIONS (32), which the descriptor reserve counts.
# Each holds at most a request line and a header block in memory (about 1.3 MiB), so 32 cost
# at most ~40 MiB; a cron burst beyond that waits in the client's retry.
MAX_CONNECTIONS = INJECT_SESSIONS
# Seconds from connect to the end of the message. The client has the whole message in memory
# before it connects, so even 10 MiB arrive in well under a second; only a stuck or hostile
# client gets near this.
REQUEST_TIMEOUT = 300.0
# The queue writer's backlog before we stop reading (the SMTP listener's figure: 4 flushes).
MAX_WRITER_BACKLOG = 4 * 64 * 1024
WRITER_BACKLOG_POLL = 0.01
# The kernel's accept queue for the socket (cron bursts: many sendmails started at once).
LISTEN_BACKLOG = 128
SOCKET_MODE = 0o666

_UCRED = struct.Struct("3i")          # struct ucred: pid, uid, gid


def peer_uid(transport) -> int | None:
    """The connecting process's uid from SO_PEERCRED (Linux), or None."""
    try:
        sock = transport.getHandle()
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return _UCRED.unpack(raw)[1]
    except (AttributeError, OSError, struct.error):
        return None


def login_name(uid: int) -> str | None:
    """Blocking (NSS): the user name of `uid`, or None."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


class PickupProtocol(protocol.Protocol):
    log = Logger(namespace="mailappliance.sendmail.inject")

    def __init__(self, factory: "PickupFactory") -> None:
        self.factory = factory
        self.app = factory.app
        self.uid: int | None = None
        self.name: str | None = None
        self.core: core.PickupConnection | None = None
        self.request: core.Request | None = None
        self.writer = None
        self.sender = ""
        self.recipients: list[str] = []
        self.paused = False
        self.waiting = False            # the name lookup, the writer or the commit is busy
        self.committing = False         # the message is complete and being committed
        self.lost = False
        self.replied = False
        self.timer = None
        self.backlog_timer = None
        self.drain = None

    # -- connection -----------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.factory.active.add(self)
        stats_mod.connection_opened(self.app.stats, "inject")
        reactor = self.app.reactor
        self.timer = reactor.callLater(self.factory.timeout, self._timed_out)
        drain = self.app.drain
        if drain is not None and drain.stopping:
            self._reply(core.EX_TEMPFAIL, "the server is stopping; try again")
            return
        if drain is not None:
            self.drain = drain.register(self.close_now)
        self.uid = self.factory.peer_uid(self.transport)
        if self.uid is None:
            self._reply(core.EX_TEMPFAIL, "no peer credentials on this socket")
            return
        # Nothing is read before the caller's name is known (the default sender needs it).
        self._pause()
        self.waiting = True
        d = self.factory.run_blocking(login_name, self.uid)
        d.addCallback(self._named)
        d.addErrback(self._internal, "name lookup")

    def _named(self, name: str | None) -> None:
        self.waiting = False
        self.name = name
        if self.lost or self.replied:
            return
        if self.app.drain is not None and self.app.drain.stopping:
            self._reply(core.EX_TEMPFAIL, "the server is stopping; try again")
            return
        self.core = core.PickupConnection(self.app.settings.smtp.databytes)
        self.transport.write(core.greeting(self.app.settings.smtp.databytes))
        self._resume()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.lost = True
        self.factory.active.discard(self)
        stats_mod.connection_closed(self.app.stats, "inject")
        for t in (self.timer, self.backlog_timer):
            if t is not None and t.active():
                t.cancel()
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if self.drain is not None:
            self.drain.done()
            self.drain = None

    def close_now(self) -> None:
        """Graceful stop: a message not yet committed is refused with 75 (never acknowledged,
        so the client may retry; nothing is lost)."""
        if not self.replied and not self.committing:
            self._reply(core.EX_TEMPFAIL, "the server is stopping; try again")
        elif self.replied and not self.lost:
            self.transport.loseConnection()

    def _timed_out(self) -> None:
        self.timer = None
        self.log.info("inject: uid {uid}: no complete request within {t:.0f} s, closing",
                      uid=self.uid, t=self.factory.timeout)
        if not self.replied:
            self._reply(core.EX_TEMPFAIL, f"request not complete within "
                        f"{self.factory.timeout:.0f} s")
        self.transport.abortConnection()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self.paused and not self.lost:
            self.paused = False
            self.transport.resumeProducing()

    # -- input --------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.core is None or self.replied:
            return
        self.core.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        while not self.waiting and not self.replied and not self.lost:
            ev = self.core.next_event()
            if ev is core.NEED_DATA:
                return
            if isinstance(ev, core.Refusal):
                self.log.info("inject: uid {uid} ({name}): refused: {why}", uid=self.uid,
                              name=self.name or "?", why=ev.text)
                self._reply(ev.code, ev.text)
                return
            if isinstance(ev, core.Request):
                self.request = ev
                if self.drain is not None:
                    self.drain.busy()
            elif isinstance(ev, core.Head):
                if not self._start_message(ev.data):
                    return
            elif isinstance(ev, core.Body):
                self.writer.write(ev.data)
                if self.writer.pending_bytes > MAX_WRITER_BACKLOG:
                    self._wait_for_writer()
                    return
            elif ev is core.END:
                self._commit()
                return

    def _start_message(self, head: bytes) -> bool:
        from mailappliance.sendmail import Options, UsageError, build_message, default_sender
        req = self.request
        settings = self.app.settings
        default_domain = settings.default_domain or settings.hostname
        opts = Options()
        opts.recipients = list(req.recipients)
        opts.extract = req.extract
        opts.fullname = req.fullname
        try:
            if req.sender is None:
                sender = default_sender(self.name or f"uid-{self.uid}", default_domain,
                                        uid=self.uid)
            else:
                sender = default_sender(req.sender, default_domain, given=True)
            now = self.app.reactor.seconds()
            unique = f"{int(now)}.{os.getpid()}.{secrets.token_hex(4)}.mailappliance"
            prefix, recipients = build_message(
                opts, head, sender=sender, hostname=settings.hostname,
                default_domain=default_domain, uid=self.uid, now=now, unique=unique,
                user=self.name, via="the inject socket")
        except UsageError as e:
            self._reply(core.EX_USAGE, str(e))
            return False
        except OverflowError:
            self._reply(core.EX_DATAERR, "header block too large")
            return False
        if not recipients:
            self._reply(core.EX_USAGE, "no recipients (give them as arguments, or use -t)")
            return False
        self.sender, self.recipients = sender, recipients
        # DKIM (docs/MAILAUTH.md): a message that may be signed is held whole (at most
        # databytes) and signed before its commit, as the SMTP session does for its users.
        signing = settings.dkim.sign and self.app.signer.maybe_keys()
        self.writer = HeldMessage() if signing else self.app.injector.begin()
        self.writer.write(prefix)
        return True

    def _wait_for_writer(self) -> None:
        self._pause()
        self.waiting = True
        self.backlog_timer = self.app.reactor.callLater(WRITER_BACKLOG_POLL, self._check_writer)

    def _check_writer(self) -> None:
        self.backlog_timer = None
        if self.lost or self.writer is None:
            return
        if self.writer.pending_bytes <= MAX_WRITER_BACKLOG:
            self.waiting = False
            self._resume()
            self._pump()
        else:
            self.backlog_timer = self.app.reactor.callLater(WRITER_BACKLOG_POLL,
                                                            self._check_writer)

    def _commit(self) -> None:
        writer, self.writer = self.writer, None
        self.waiting = self.committing = True
        origin = f"local uid {self.uid} ({self.name or '?'}) via inject"
        try:
            if isinstance(writer, HeldMessage):
                d = self._sign_and_inject(writer.data(), origin)
            else:
                d = writer.commit(self.sender, list(self.recipients), origin)
        except ValueError as e:
            self.waiting = False
            self._reply(core.EX_USAGE, str(e))
            return
        if self.timer is not None and self.timer.active():
            self.timer.cancel()              # the message is in; the commit is bounded by the
            self.timer = None                # queue's own error handling, not by the client
        d.addCallbacks(self._committed, self._commit_failed)
        d.addErrback(self._internal, "commit")

    def _sign_and_inject(self, message: bytes, origin: str) -> defer.Deferred:
        check_envelope(self.sender, list(self.recipients))       # ValueError: refused now
        # Lines over RFC 5321's limit are re-encoded before signing (reencode.py), so the
        # signature covers the bytes that are sent.
        d = self.app.signer.fit_and_sign(message, self.sender, linesep=b"\n")

        def unsigned(failure):
            self.log.failure("inject: uid {uid}: DKIM signing failed; queued unsigned",
                             failure, uid=self.uid)
            return b"", message

        d.addErrback(unsigned)
        d.addCallback(lambda signed: self.app.injector.inject(
            signed[0] + signed[1], self.sender, list(self.recipients), origin))
        return d

    def _committed(self, qid) -> None:
        self.waiting = False
        self.log.info("inject: uid {uid} ({name}): new msg {qid} from <{sender}> to "
                      "{n} recipients", uid=self.uid, name=self.name or "?", qid=qid,
                      sender=self.sender, n=len(self.recipients))
        self._reply(core.EX_OK, f"queued as {qid}")

    def _commit_failed(self, failure) -> None:
        failure.trap(QueueWriteError, ValueError, OSError)
        self.waiting = False
        code = core.EX_USAGE if failure.check(ValueError) and not failure.check(OSError) \
            else core.EX_TEMPFAIL
        text = str(failure.value)
        if code == core.EX_TEMPFAIL:
            text = f"qq write error or disk full: {text}"
        self.log.warn("inject: uid {uid} ({name}): {why}", uid=self.uid,
                      name=self.name or "?", why=text)
        self._reply(code, text)

    def _internal(self, failure, what: str) -> None:
        self.waiting = False
        self.log.failure("inject: uid {uid}: {what} failed", failure, uid=self.uid, what=what)
        if not self.replied:
            self._reply(core.EX_TEMPFAIL, f"internal error ({what}); see the server's log")

    def _reply(self, code: int, text: str) -> None:
        if self.replied or self.lost:
            return
        self.replied = True
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if self.drain is not None:
            self.drain.idle()
        self.transport.write(core.encode_reply(code, text))
        self.transport.loseConnection()


class _Busy(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(core.encode_reply(
            core.EX_TEMPFAIL, f"busy: {MAX_CONNECTIONS} injections in progress; try again"))
        self.transport.loseConnection()


class PickupFactory(protocol.ServerFactory):
    noisy = False
    log = Logger(namespace="mailappliance.sendmail.inject")

    def __init__(self, app, run_blocking=None) -> None:
        self.app = app
        self.active: set[PickupProtocol] = set()
        self.max_connections = MAX_CONNECTIONS
        self.timeout = REQUEST_TIMEOUT
        self.peer_uid = peer_uid            # tests hand in their own (StringTransport has none)
        if run_blocking is None:
            from twisted.internet.threads import deferToThreadPool

            def run_blocking(f, *a):
                return deferToThreadPool(app.reactor, app.threadpool, f, *a)
        self.run_blocking = run_blocking

    def buildProtocol(self, addr):
        if len(self.active) >= self.max_connections:
            self.log.warn("inject: {n} injections in progress; one more told to retry",
                          n=len(self.active))
            p = _Busy()
        else:
            p = PickupProtocol(self)
        p.factory = self
        return p


def build_factory(app, kind: str) -> PickupFactory:
    return PickupFactory(app)


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


def build_endpoint(app, kind: str, description: str, reactor):
    """unix:PATH with mode 0666, a stale-socket lock and a deeper backlog (config.py refuses
    every other endpoint type for inject)."""
    body = description.split(":", 1)[1]
    path, params = core.unix_path(description), re.split(r"(?<!\\):", body)[1:]
    keep = [p for p in params if not p.startswith(("mode=", "lockfile=", "backlog="))]
    text = ":".join([f"unix:{_escape(path)}", *keep, f"mode={SOCKET_MODE:o}", "lockfile=1",
                     f"backlog={LISTEN_BACKLOG}"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return endpoints.serverFromString(reactor, text)
