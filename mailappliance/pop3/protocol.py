"""The Twisted side of POP3: bytes in and out, timers, the password check, the mailbox.

The protocol feeds what it reads to core.POP3Session and carries out the actions it returns.
Everything slow or blocking is somebody else's thread or a timer:
- password checks: the injected `authenticate` (users.auth.Authenticator: bcrypt in the pool);
- the login penalty: reactor.callLater, so a penalised client waits alone;
- mailbox lock + listing and the QUIT update: `run_blocking` (the application thread pool);
- RETR: a message that fits in one read (READ_CHUNK) goes out in one write; a larger one is
  streamed by a pull producer, one chunk per request of the transport, so a 50 MB message costs
  one chunk of memory and a slow reader holds back only itself.
Opening and reading a message file happen on the reactor thread: page-cache reads of one chunk,
as qmail-pop3d does them, far cheaper than a thread hop per message.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from mailappliance import stats
from mailappliance.netwrite import REPLY_FLUSH_BYTES, close_now, write_now
from mailappliance.access.checkslot import CheckSlot
from mailappliance.access.relay import normalize_ip
from mailappliance.deadline import POP3_SESSION_LIFETIME, Deadline
from mailappliance.pop3 import core
from mailappliance.pop3.core import (
    NEED_DATA, PAUSED, Authenticate, Close, MessageEncoder, Retrieve, Send, StartTLS, Update,
    encode_whole, escape_login)
from mailappliance.pop3.mailbox import READ_CHUNK, MailboxBusy, MailboxError, MessageGone
from mailappliance.pop3.penalty import LoginPenalty

# RFC 1939 section 3: an inactivity autologout timer of at least 10 minutes.
DEFAULT_TIMEOUT = 600


class POP3Factory(ServerFactory):
    """Carries the injected dependencies; one per listener (pop3 / pop3s share the penalty)."""

    noisy = False         # no "Starting factory" lines in the mail log

    def __init__(self, *, reactor, hostname: str,
                 authenticate: Callable[[str, str], defer.Deferred],
                 open_mailbox: Callable[[Any], defer.Deferred],
                 run_blocking: Callable[..., defer.Deferred],
                 grant: Callable[[str, Any], None] | None = None,
                 penalty: LoginPenalty | None = None,
                 tls: Callable[[], Any] = lambda: None,
                 implicit_tls: bool = False, require_tls: bool = False,
                 timeout: float = DEFAULT_TIMEOUT,
                 drain: Callable[[], Any] = lambda: None,
                 stats: dict | None = None, kind: str = "pop3",
                 limits: Callable[[], tuple[int, int, int]] | None = None) -> None:
        self.reactor = reactor
        self.hostname = hostname
        self.authenticate = authenticate
        self.open_mailbox = open_mailbox
        self.run_blocking = run_blocking
        self.grant = grant
        self.penalty = penalty if penalty is not None else LoginPenalty()
        self.tls = tls                      # callable: the current TLSContext or None
        self.implicit_tls = implicit_tls
        self.require_tls = require_tls
        self.timeout = timeout
        self.drain = drain                  # callable: app.drain (graceful stop) or None
        self.stats = stats                  # app.stats: connections.<kind>.now/.total
        self.kind = kind
        # () -> (max_per_ip, max_connections, descriptor share), read at every connection so
        # a reload applies to the next client; None: no limits (tests of other things).
        self.limits = limits
        self.connections = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """Take a connection slot for `ip`, or the reply key saying why not (then close): the
        per-address limit first, so a flood from one address is told so, as SMTP does."""
        if self.limits is not None:
            max_per_ip, max_connections, share = self.limits()
            if self.per_ip.get(ip, 0) >= max_per_ip:
                return "too_many_from_ip"
            if self.connections >= max_connections:
                return "too_many_connections"
            if self.connections >= share:
                return "out_of_descriptors"
        self.connections += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.connections -= 1
        left = self.per_ip.get(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)

    def buildProtocol(self, addr):
        p = POP3ServerProtocol()
        p.factory = self
        return p


@implementer(IPullProducer)
class _MessageSender:
    """Streams one message file: one READ_CHUNK per resumeProducing."""

    def __init__(self, proto: "POP3ServerProtocol", fd: int, encoder: MessageEncoder) -> None:
        self.proto = proto
        self.fd: int | None = fd
        self.encoder = encoder

    def resumeProducing(self) -> None:
        transport = self.proto.transport
        while self.fd is not None:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except OSError as e:
                self.proto._stream_failed(e)
                return
            if data:
                out = self.encoder.feed(data)
                if self.encoder.done or not out:
                    if self.encoder.done:
                        if out:
                            transport.write(out)
                        break
                    continue          # a lone held-back CR: read on, a pull producer must write
                transport.write(out)
                self.proto._moved(len(out))   # the reader keeps up: time at MIN_DATA_RATE
                return
            break
        if self.fd is None:
            return                    # stopped meanwhile
        self.close()
        self.proto._stream_finished(self.encoder.finish())

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


@implementer(IPushProducer)
class POP3ServerProtocol(Protocol):
    """One POP3 session. Between RETR streams it is its transport's streaming producer: while
    the client leaves more than the transport's buffer of replies unread, the session answers
    nothing, and once core.MAX_PENDING_INPUT waits unanswered it reads nothing either
    (netwrite.REPLY_FLUSH_BYTES, docs/LIMITS.md; reading goes on until then because a TLS layer
    pauses its producer while its handshake is pending). A streamed message is the transport's
    pull producer instead, one chunk per drain."""

    log = Logger(namespace="mailappliance.pop3")

    factory: POP3Factory

    def __init__(self) -> None:
        self.session: core.POP3Session | None = None
        self.ip = "unknown"
        self.mailbox = None
        self.user = None
        self._connected_at: float | None = None   # a session started (connect line written)
        self._sender: _MessageSender | None = None
        self._timer = None
        self._deadline: Deadline | None = None   # per request and per session (deadline.py)
        self._pending_call = None
        self._slot: CheckSlot | None = None   # the password check's turn (access/checkslot.py)
        self._closed = False
        self._lost = False
        self._reading_paused = False
        self._updating = False
        self._in_pump = False
        self._drain = None                  # drain.SessionHandle while registered
        self._out_paused = False            # the client has not read our replies
        self._counted = False               # holds a connection slot of the factory
        self._registered = False            # we are the transport's producer

    # --- connection life ------------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        if f.stats is not None:
            stats.connection_opened(f.stats, f.kind)
        peer = self.transport.getPeer()
        self.ip = normalize_ip(str(getattr(peer, "host", "unknown")))
        refusal = f.admit(self.ip)
        if refusal is not None:
            self.log.warn("connection refused: rip={ip} port={kind}: {text}", kind=f.kind,
                          ip=self.ip, text=core.REPLIES[refusal])
            self._closed = True
            self.transport.write(core.reply(refusal))
            self.transport.loseConnection()
            return
        self._counted = True
        tls = f.tls()
        self.session = core.POP3Session(
            hostname=f.hostname,
            tls_available=tls is not None and not f.implicit_tls,
            tls_active=f.implicit_tls,
            require_tls=f.require_tls)
        # One lazy timer: bytes that do not complete a command earn no time (deadline.py).
        self._deadline = Deadline(f.timeout, f.reactor.seconds(), POP3_SESSION_LIFETIME)
        self._timer = f.reactor.callLater(f.timeout, self._check_idle)
        drain = f.drain()
        if drain is not None:
            if drain.stopping:
                self._closed = True
                self.transport.write(core.reply("shutting_down"))
                self.transport.loseConnection()
                return
            self._drain = drain.register(self.close_now)
        self._register()
        # One connect and one disconnect line per session, as SMTP (docs/MONITORING.md).
        self._connected_at = f.reactor.seconds()
        self.log.info("connect: rip={ip} kind={kind}", ip=self.ip, kind=f.kind)
        self.session.start()
        self._pump()

    def close_now(self) -> None:
        """Graceful stop (mailappliance/drain.py): an idle session is closed at once; nothing
        is deleted without QUIT, so this loses nothing. A QUIT update in progress is marked
        busy and finishes first."""
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            self._sender.close()
            self._sender = None
            self.transport.unregisterProducer()
            self.transport.abortConnection()
            return
        if self._out_paused:
            self._unregister()
            self.transport.abortConnection()      # the client reads nothing: no -ERR gets out
            return
        self.transport.write(core.reply("shutting_down"))
        self._close_transport()

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self.session.receive_data(data)
        self._pump()

    def connectionLost(self, reason=None) -> None:
        if self._lost:
            return
        self._lost = self._closed = True
        if self.factory.stats is not None:
            stats.connection_closed(self.factory.stats, self.factory.kind)
        if self._counted:
            self._counted = False
            self.factory.release(self.ip)
        for call in (self._timer, self._pending_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._pending_call = None
        if self._slot is not None:
            self._slot.abandon()          # a check already running releases its turn itself
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if not self._updating:
            self._release_mailbox()
        if self._drain is not None:
            self._drain.done()
            self._drain = None
        started, self._connected_at = self._connected_at, None
        if started is not None:
            user = self.user.address if self.user is not None else ""
            self.log.info("disconnect: rip={ip} kind={kind} user=<{user}> seconds={t:.1f}",
                          ip=self.ip, kind=self.factory.kind, user=escape_login(user),
                          t=max(0.0, self.factory.reactor.seconds() - started))

    def _release_mailbox(self) -> None:
        box, self.mailbox = self.mailbox, None
        if box is not None:
            box.unlock()

    # --- idle timeout: one timer, re-armed lazily -------------------------------------------

    def _activity(self) -> None:
        """A request was handled: the next one has [pop3] timeout from now."""
        self._deadline.request_done(self.factory.reactor.seconds(), self.factory.timeout)

    def _moved(self, nbytes: int) -> None:
        """Output the client read: time at deadline.MIN_DATA_RATE, never past the timeout."""
        self._deadline.moved(self.factory.reactor.seconds(), nbytes)

    def _check_idle(self) -> None:
        self._timer = None
        if self._closed:
            return
        f = self.factory
        now = f.reactor.seconds()
        deadline = self._deadline
        if not deadline.expired(now):
            self._timer = f.reactor.callLater(deadline.remaining(now), self._check_idle)
            return
        self.log.info("timeout: rip={ip} user=<{user}>{why}", ip=self.ip,
                      user=escape_login(self.session.login or ""),
                      why=(f": session older than {POP3_SESSION_LIFETIME} s"
                           if deadline.over_lifetime(now) else ""))
        if self._sender is not None or self._out_paused:
            # Stuck with a full socket buffer (mid-message or behind pipelined answers): no
            # -ERR can get through.
            if self._sender is not None:
                self._sender.close()
                self._sender = None
            self._closed = True
            self._unregister()
            self.transport.abortConnection()
            return
        self.session.timed_out()
        self._pump()

    # --- the action loop ------------------------------------------------------------------

    def _pump(self) -> None:
        if self._in_pump:
            return            # re-entered from a synchronous completion
        if self._out_paused:
            self._flow_control()          # waiting to drain: bound what we read meanwhile
            return
        self._in_pump = True
        out: list[bytes] = []
        size = 0
        acted = False
        try:
            session = self.session
            while not self._closed:
                action = session.next_action()
                kind = type(action)
                if kind is Send:
                    out.append(action.data)
                    size += len(action.data)
                elif action is NEED_DATA or action is PAUSED:
                    break
                elif kind is Retrieve:
                    before = len(out)
                    if not self._retrieve(action, out):
                        acted = True
                        break         # streaming: resumes from _stream_finished
                    size += sum(len(b) for b in out[before:])
                elif kind is Authenticate:
                    self._authenticate(action)
                elif kind is StartTLS:
                    self._flush(out)
                    self._start_tls()
                elif kind is Update:
                    self._update(action)
                elif kind is Close:
                    self._flush(out)
                    self._close_transport()
                else:
                    raise AssertionError(f"unknown POP3 action {action!r}")
                acted = True
                if size >= REPLY_FLUSH_BYTES and not self._closed:
                    # Hand a long pass's replies over now: the transport pauses us when the
                    # client has not read what it already has, and resumes us when it has.
                    self._flush(out)
                    size = 0
                    if self._out_paused:
                        break
            if acted:
                self._activity()      # a request was handled: the next one's time starts
            self._flush(out)
            self._flow_control()
        finally:
            self._in_pump = False

    # --- IPushProducer: the transport says when the client stops reading our replies ---------

    def pauseProducing(self) -> None:
        self._out_paused = True

    def resumeProducing(self) -> None:
        if not self._out_paused:
            return
        self._out_paused = False
        # The client read the transport's whole buffer (FileDescriptor.bufferSize).
        self._moved(65536)
        self._resume()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the rest."""

    def _register(self) -> None:
        self._out_paused = False
        self._registered = True
        self.transport.registerProducer(self, True)

    def _unregister(self) -> None:
        # A transport with a producer closes only once it is unregistered; a stream replaces us.
        if self._registered:
            self._registered = False
            self._out_paused = False
            self.transport.unregisterProducer()

    def _close_transport(self) -> None:
        self._closed = True
        self._unregister()
        close_now(self.transport)

    def _flush(self, out: list[bytes]) -> None:
        """Send the replies gathered so far, at once when the socket takes them (netwrite)."""
        if out:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _flow_control(self) -> None:
        if self._closed:
            return
        want = self.session.pending_input > core.MAX_PENDING_INPUT
        if want and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not want and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _resume(self) -> None:
        """A request finished outside dataReceived: handle what was pipelined behind it."""
        if not self._closed:
            self._pump()

    # --- AUTHORIZATION ----------------------------------------------------------------------

    def _authenticate(self, action: Authenticate) -> None:
        # One check per address at a time, after its penalty (access/penalty.py's turns).
        f = self.factory
        self._slot = CheckSlot(f.penalty, f.reactor, self.ip)
        self._slot.wait().addCallback(lambda _: self._check_password(action))

    def _release(self, ok: bool | None) -> float:
        slot, self._slot = self._slot, None
        return 0.0 if slot is None else slot.release(ok)

    def _check_password(self, action: Authenticate) -> None:
        if self._closed:
            self._release(None)
            return
        d = defer.maybeDeferred(self.factory.authenticate, action.login, action.password)
        d.addCallback(self._password_checked, action.login)
        d.addErrback(self._password_error, action.login)

    def _password_error(self, failure, login: str) -> None:
        # The user store failed (disk, database): not the client's fault, so no penalty, but
        # no access either.
        self._release(None)
        if failure.check(OSError):
            # The directory is unreachable (DirectoryUnavailable) or the disk failed: one
            # line, and a temporary answer (RFC 3206 SYS/TEMP), never "wrong password".
            self.log.error("password check failed: rip={ip} user=<{user}>: {why}",
                           ip=self.ip, user=escape_login(login), why=str(failure.value))
        else:
            self.log.failure("password check failed: rip={ip} user=<{user}>", failure,
                             ip=self.ip, user=escape_login(login))
        if not self._closed:
            self.session.login_unavailable()
            self._resume()

    def _password_checked(self, user, login: str) -> None:
        f = self.factory
        if user is None:
            delay = self._release(False)
            # One line per failure with the address and the escaped login, for fail2ban:
            #   failregex = ^\s*pop3: login failed: rip=<HOST> user=   (conf/fail2ban)
            self.log.warn("login failed: rip={ip} user=<{user}> tls={tls} delay={delay:g}s",
                          ip=self.ip, user=escape_login(login),
                          tls="yes" if self.session.tls_active else "no", delay=delay)
            if self._closed:
                return
            self._pending_call = f.reactor.callLater(delay, self._answer_failure)
            return
        self._release(True)
        if self._closed:
            return
        self.user = user
        if f.grant is not None:
            f.grant(self.ip, user)
        d = defer.maybeDeferred(f.open_mailbox, user)
        d.addCallbacks(self._mailbox_opened, self._mailbox_failed)

    def _answer_failure(self) -> None:
        self._pending_call = None
        if not self._closed:
            self.session.login_failed()
            self._resume()

    def _mailbox_opened(self, result) -> None:
        box, messages = result
        if self._closed:
            box.unlock()
            return
        self.mailbox = box
        self.session.login_succeeded(messages)
        self.log.info("login ok: rip={ip} user=<{user}> tls={tls} messages={count}",
                      ip=self.ip, user=escape_login(self.user.address),
                      tls="yes" if self.session.tls_active else "no", count=len(messages))
        self._resume()

    def _mailbox_failed(self, failure) -> None:
        busy = failure.check(MailboxBusy) is not None
        if busy:
            self.log.info("mailbox in use: rip={ip} user=<{user}>",
                          ip=self.ip, user=escape_login(self.user.address))
        else:
            self.log.failure("cannot open mailbox: rip={ip} user=<{user}>", failure,
                             ip=self.ip, user=escape_login(self.user.address))
        self.user = None
        if not self._closed:
            self.session.mailbox_unavailable(in_use=busy)
            self._resume()

    def _start_tls(self) -> None:
        tls = self.factory.tls()
        if tls is None:       # certificate removed by a reload between CAPA and STLS
            self._closed = True
            self._unregister()
            self.transport.abortConnection()
            return
        self.transport.startTLS(tls.options())
        self.session.tls_started()

    # --- TRANSACTION ------------------------------------------------------------------------

    def _retrieve(self, action: Retrieve, out: list[bytes]) -> bool:
        """True when the answer is complete in `out`; False when a stream was started."""
        try:
            fd = self.mailbox.open_fd(action.message)
        except MessageGone:
            self.session.retrieve_failed()
            return True
        except MailboxError as e:
            self.log.error("cannot open message: user=<{user}> {why}",
                           user=escape_login(self.user.address), why=str(e))
            self.session.retrieve_failed()
            return True
        try:
            chunk = os.read(fd, READ_CHUNK)
        except OSError as e:
            os.close(fd)
            self.log.error("cannot read message: {why}", why=str(e))
            self.session.retrieve_failed()
            return True
        out.append(self.session.retrieve_opened())
        if len(chunk) < READ_CHUNK and action.body_lines is None:
            # The common case: the whole message in one read (a regular file returns less
            # than asked only at its end), one write.
            os.close(fd)
            out.append(encode_whole(chunk))
            self.session.retrieve_done()
            return True
        encoder = MessageEncoder(action.body_lines)
        out.append(encoder.feed(chunk))
        if len(chunk) < READ_CHUNK or encoder.done:
            os.close(fd)
            out.append(encoder.finish())
            self.session.retrieve_done()
            return True
        self._flush(out)
        self._unregister()
        self._sender = _MessageSender(self, fd, encoder)
        # A pull producer may be run at once by registerProducer (and finish a short tail).
        self.transport.registerProducer(self._sender, False)
        return self._sender is None

    def _stream_finished(self, tail: bytes) -> None:
        self._sender = None
        self.transport.unregisterProducer()
        self._register()          # the stream drained: nothing of ours waits unsent
        self.transport.write(tail)
        self.session.retrieve_done()
        self._resume()

    def _stream_failed(self, error: OSError) -> None:
        # The +OK is out; the only honest signal left is to drop the connection (the client
        # sees no final ".", and nothing is deleted without QUIT).
        self.log.error("read error during RETR: user=<{user}> {why}",
                       user=escape_login(self.user.address), why=str(error))
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        self.transport.unregisterProducer()
        self._closed = True
        self.transport.abortConnection()

    def _update(self, action: Update) -> None:
        self._updating = True
        if self._drain is not None:
            self._drain.busy()
        d = self.factory.run_blocking(self.mailbox.update, action.deleted, action.kept)
        d.addErrback(self._update_error, len(action.deleted))
        d.addCallback(self._updated, action)

    def _update_error(self, failure, count: int) -> int:
        self.log.failure("QUIT update failed: user=<{user}>", failure,
                         user=escape_login(self.user.address))
        return max(count, 1)

    def _updated(self, failures: int, action: Update) -> None:
        self._updating = False
        self.log.info("quit: rip={ip} user=<{user}> deleted={deleted} kept={kept}"
                      " failures={failures}", ip=self.ip, user=escape_login(self.user.address),
                      deleted=len(action.deleted), kept=len(action.kept), failures=failures)
        self._release_mailbox()
        if not self._closed:
            self.session.update_done(failures)     # the +OK, then the session closes
            self._resume()
        if self._drain is not None:
            self._drain.idle()      # after the +OK: a stopping server has nothing left to wait for
