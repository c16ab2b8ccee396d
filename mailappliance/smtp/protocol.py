"""The Twisted side of the SMTP receiver: tcpserver + qmail-smtpd's policy around the sans-IO core.

Per connection (tcpserver's job): the rules lookup (deny = close without a word), connection
limits (421), the rules environment kept for the session, the idle timer, the DNSBL check
started at connect (rblsmtpd's job; its verdict applies at RCPT, as rblsmtpd's).

Per command (qmail-smtpd's job): the core parses and sequences; this adapter answers the events
that need policy: RCPT (the relay decision in access/relay_policy.py), DATA (open a queue
writer, write our Received: line), the end of the message (commit; "250 ok" only after the
commit Deferred fires). Decisions may be Deferreds; while one is pending the core hands out no
further event, so pipelined replies leave in command order. Replies produced in one pass are
written with one transport.write.

Seams:
- The listener: `smtp/service.py`'s factory, seen here only as a `Listener` (its app, its kind,
  the connection slots and the message counter); service.py imports this module, never the
  other way.
- AUTH (RFC 4954) and the submission policy live in smtp/submission.py (`SessionAuth`, one per
  connection, seeing the session through `_SessionView`, never this protocol): it sets
  `core.auth_mechanisms` (only inside TLS, or in clear from loopback when allowed), answers
  `Auth`/`AuthResponse` (a 334 keeps the core reading responses, 235 sets `core.authenticated`,
  which the relay policy and the Received: line honour), refuses MAIL with 530 on submission
  without AUTH and with 553 for a sender not the user's, and checks the From: header of
  authenticated sessions at the end of DATA (smtp/binding.py's FromScanner sees the DataChunk
  pieces of the header as they stream past). Authenticated sessions skip the DNSBL.
- STARTTLS is done here: `_start_tls` writes the 220 before `transport.startTLS`, and the core
  drops input pipelined behind the command.
- DNSBL (rblsmtpd): `app.dnsbl.check` at connect, verdict applied at each RCPT (`_after_rbl`).

Recipient lookups call the user store on the reactor thread: each is one or two primary-key
SELECTs on a SQLite database in WAL mode (readers never wait for writers, no fsync), tens of
microseconds; sending them through the thread pool would cost more than the query and queue them
behind the queue's fsyncs in the same pool, adding a disk latency to every RCPT under load.
With PostgreSQL ([users] database) they go through `app.lookups` (users/lookups.py): the cache
answers at once, a miss is a Deferred from the directory's own threads. The roaming grant is
asked the same way at connect (reading pauses until it is known) and at RCPT; when it cannot
be known and the verdict depends on it, RCPT answers 451 (never a wrong accept or reject).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import typing
from typing import Any, Mapping

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailappliance.access import penalty as login_penalty
from mailappliance.access import relay_policy
from mailappliance.access.relay import normalize_ip
from mailappliance.access.rules import DEFAULT_ALLOW
from mailappliance.address import classify
from mailappliance.deadline import SMTP_SESSION_LIFETIME, Deadline
from mailappliance import enddata
from mailappliance.netwrite import REPLY_FLUSH_BYTES, close_now, write_now
from mailappliance.queue.inject import QueueWriteError
from mailappliance.smtp import replies
from mailappliance.smtp.core import (
    CLOSED_EVENT, NEED_DATA, PAUSED, Auth, AuthResponse, DataChunk, DataStart, MailFrom,
    MessageEnd, RcptTo, ServerConnection, StartTLS, received_header)
from mailappliance.smtp.submission import SessionAuth
from mailappliance.smtp.trace import MessageIdScanner, trace_text
from mailappliance.smtp.replies import Reply
from mailappliance.users.directory import MISS

# Pipelined input waiting while a decision is pending: above this, stop reading the socket until
# the decision arrives (TCP flow control pushes back on the client). Four command lines' worth of
# 16 KiB is plenty for any real PIPELINING client (RFC 2920 asks clients to stop at the window).
MAX_PIPELINED_INPUT = 64 * 1024
# Message bytes the queue writer may hold in memory before we stop reading the socket.
MAX_WRITER_BACKLOG = 4 * 64 * 1024
# How often to look again at a writer backlog while reading is paused for it.
WRITER_BACKLOG_POLL = 0.01
# qmail greetdelay patch (SMTPD_GREETDELAY / GREETDELAY in the rules environment): seconds to
# wait before the greeting; a client speaking earlier is refused. Capped so a typo cannot hold
# connection slots for long.
MAX_GREETDELAY = 60.0

TEMPORARY_FAILURE = Reply(451, "4.3.0", "sorry, temporary failure (#4.3.0)")

_UNSET = object()


class Listener(typing.Protocol):
    """What a session needs of its listener (smtp/service.py's SMTPFactory)."""

    app: Any            # the service tree: settings, reactor, store, injector, grants, ...
    kind: str           # "smtp", "submission" or "submissions"

    def admit(self, session: "SMTPServerProtocol") -> Reply | None:
        """Take a connection slot for `session`, or say why not (421 and close)."""

    def release(self, session: "SMTPServerProtocol") -> None:
        """Give the slot back (once, at connectionLost)."""

    def count_message(self) -> None:
        """One more message accepted on this listener."""


@implementer(IHalfCloseableProtocol, IPushProducer)
class SMTPServerProtocol(protocol.Protocol):
    """One SMTP session. It is its transport's streaming producer for its whole life: while the
    client leaves more than the transport's buffer of replies unread, the session answers
    nothing, and once MAX_PIPELINED_INPUT waits unanswered it reads nothing either
    (netwrite.REPLY_FLUSH_BYTES, docs/LIMITS.md). Reading goes on until then because a TLS
    layer pauses its producer while its handshake is pending: it needs the client's bytes."""

    log = Logger(namespace="mailappliance.smtp")

    def __init__(self, factory: Listener) -> None:
        self.factory = factory
        self.app = factory.app
        self.core: ServerConnection | None = None
        self.ip = ""
        self.env: Mapping[str, str] = {}
        self.counted = False           # holds a connection slot in the factory
        self._out: list[bytes] = []
        self._waiting = False          # a decision Deferred is pending
        self._in_pump = False
        self._sync_result: Any = _UNSET
        self._pending_ev = None
        self._timer = None
        self._deadline: Deadline | None = None   # per request and per session (deadline.py)
        self._greet_timer = None
        self._writer = None
        self._paused = False           # reading stopped: pipelined input or the writer's backlog
        self._out_paused = False       # answering stopped: the client does not read our replies
        self._registered = False       # we are the transport's producer
        self._out_bytes = 0            # bytes in self._out
        self._backlog_timer = None
        self._lost = False
        self._rbl: Any = None          # None: no refusal; Refusal; or _UNSET while pending
        self._rbl_waiters: list[Deferred] | None = None
        self.messages = 0
        self.drain = None              # drain.SessionHandle while registered
        self.auth: SessionAuth | None = None
        self._from_scan = None         # binding.FromScanner while an authenticated DATA runs
        self._spf = None               # mailauth's SPF result of this transaction's MAIL FROM
        self._tx: enddata.Transaction | None = None    # while end-of-data checks are due
        self._checks: list = []        # the app.end_of_data checks this transaction wants
        self._checking: Deferred | None = None   # their run, while the client waits for it
        self._mid_scan: MessageIdScanner | None = None   # while DATA runs: the Message-ID
        self._connected_at: float | None = None          # a session (not a refusal) started
        self._granted = False          # the roaming grant as last known (relay_client())

    # --- connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        app, factory = self.app, self.factory
        settings = app.settings
        peer = self.transport.getPeer()
        self.ip = normalize_ip(getattr(peer, "host", "") or "")
        rules = settings.rules
        decision = rules.lookup(self.ip) if rules is not None and self.ip else DEFAULT_ALLOW
        if not decision.allow:
            # tcpserver: "deny" drops the connection before the server program starts.
            self.log.info("tcpserver: deny {kind} {ip} (rules line {line})",
                          kind=factory.kind, ip=self.ip, line=decision.line)
            self.transport.loseConnection()
            return
        drain = app.drain
        refusal = replies.SHUTTING_DOWN if drain is not None and drain.stopping \
            else factory.admit(self)
        if refusal is not None:
            self.log.warn("tcpserver: {kind} {ip}: {text}", kind=factory.kind, ip=self.ip,
                          text=refusal.text)
            self.transport.write(refusal.render())
            self.transport.loseConnection()
            return
        env = dict(decision.env)
        try:
            granted = self._ask_grant()
        except OSError as e:
            self._grant_failed(e)
            granted = False
        if isinstance(granted, Deferred):
            # PostgreSQL cache miss: read nothing until the answer (or its failure) is in.
            self.transport.pauseProducing()

            def known(result):
                if isinstance(result, Failure):
                    if not result.check(OSError):
                        return result
                    self._grant_failed(result.value)
                    result = False
                if not self._lost:
                    self.transport.resumeProducing()
                    self._begin(env, result)
            granted.addBoth(known).addErrback(
                lambda f: self.log.failure("grant check failed: rip={ip}", f, ip=self.ip))
            return
        self._begin(env, granted)

    def _begin(self, env: dict, granted: bool) -> None:
        app, factory = self.app, self.factory
        settings = app.settings
        drain = app.drain
        self._granted = granted
        if granted:
            # vchkpw roaming users: POP-before-SMTP opens relaying for a while, without DNSBL.
            env.setdefault("RELAYCLIENT", "")
            env.setdefault("RBLSMTPD", "")
        self.env = env
        self._connected_at = app.reactor.seconds()
        # One connect and one disconnect line per session (docs/MONITORING.md).
        self.log.info("connect: rip={ip} kind={kind}", ip=self.ip, kind=factory.kind)
        smtp = settings.smtp
        hostname = settings.hostname
        implicit_tls = factory.kind == "submissions"
        self.core = ServerConnection(
            hostname, databytes=smtp.databytes, max_recipients=smtp.max_recipients,
            max_errors=smtp.max_errors,
            postmaster_domain=settings.default_domain or hostname,
            starttls_offered=app.tls is not None and not implicit_tls)
        self.core.tls = implicit_tls          # RFC 8314: the listener wraps us in TLS
        self.auth = SessionAuth(_SessionView(self))
        self.auth.configure()
        if drain is not None:
            self.drain = drain.register(self.close_now)
        self.transport.registerProducer(self, True)
        self._registered = True
        self._start_dnsbl()
        # One lazy timer: bytes that do not complete a command earn no time (deadline.py).
        self._deadline = Deadline(smtp.timeout, app.reactor.seconds(), SMTP_SESSION_LIFETIME)
        self._timer = app.reactor.callLater(smtp.timeout, self._timed_out)
        delay = _greetdelay(env)
        if delay > 0:
            self._greet_timer = app.reactor.callLater(delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._greet_timer = None
        core = self.core
        if core is None or core.closed or self._lost:
            return
        self._write(core.send(replies.greeting(self.app.settings.hostname)))
        self._pump()

    def dataReceived(self, data: bytes) -> None:
        core = self.core
        if core is None or core.closed:
            return
        core.receive_data(data)
        if self._greet_timer is not None:
            # Spoke before the greeting (qmail greetdelay / Postfix postscreen pregreet test).
            self._greet_timer.cancel()
            self._greet_timer = None
        if self._waiting or self._out_paused:
            if core.buffered > MAX_PIPELINED_INPUT:
                self._pause()
            return
        self._pump()

    def readConnectionLost(self) -> None:
        # Half-close: the client may have sent QUIT and shut down its side; answer what it sent.
        if self.core is not None and not self.core.closed:
            self.core.receive_data(b"")
            if not self._waiting:
                self._pump()

    def writeConnectionLost(self) -> None:
        """IHalfCloseableProtocol: we never half-close our side, so nothing to do."""

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        for timer in (self._timer, self._greet_timer, self._backlog_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._greet_timer = self._backlog_timer = None
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        checking, self._checking = self._checking, None
        if checking is not None:
            # Nobody waits for the verdict: stop the checks (a scanner's connection is
            # closed, a DNS question dropped) instead of letting them run to the end.
            checking.cancel()
        if self.auth is not None:
            self.auth.connection_lost()
        if self.counted:
            self.factory.release(self)
            self.counted = False
        if self.drain is not None:
            self.drain.done()
            self.drain = None
        if self._connected_at is not None:
            self.log.info("disconnect: rip={ip} kind={kind} messages={n} seconds={t:.1f}",
                          ip=self.ip, kind=self.factory.kind, n=self.messages,
                          t=max(0.0, self.app.reactor.seconds() - self._connected_at))
            self._connected_at = None

    def close_now(self) -> None:
        """Graceful stop (mailappliance/drain.py): pending replies, then 421, then close."""
        core = self.core
        if self._lost or core is None or core.closed:
            return
        pending = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        self.transport.write(pending + core.close_with(replies.SHUTTING_DOWN))
        self._close()

    def _timed_out(self) -> None:
        self._timer = None
        core = self.core
        if core is None or core.closed or self._lost:
            return
        reactor = self.app.reactor
        now = reactor.seconds()
        deadline = self._deadline
        if self._waiting and not deadline.over_lifetime(now):
            # We are the slow one (a commit in progress): the client is not idle.
            self._timer = reactor.callLater(self.app.settings.smtp.timeout, self._timed_out)
            return
        if not deadline.expired(now):
            self._timer = reactor.callLater(deadline.remaining(now), self._timed_out)
            return
        if deadline.over_lifetime(now):
            self.log.info("timeout: rip={ip}: session older than {s} s", ip=self.ip,
                          s=SMTP_SESSION_LIFETIME)
        else:
            self.log.info("timeout: rip={ip}", ip=self.ip)
        if self._out_paused:
            # Replies unread for the whole timeout: a 421 could not get through either.
            core.close_with(replies.TIMEOUT)
            self._abort()
            return
        self.transport.write(core.close_with(replies.TIMEOUT))
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._unregister()
        close_now(self.transport)

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._unregister()
        self.transport.abortConnection()

    def _unregister(self) -> None:
        # A transport with a producer closes only once it is unregistered.
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if not self._lost:
                self.transport.resumeProducing()

    # --- IPushProducer: the transport says when the client stops reading our replies ---------

    def pauseProducing(self) -> None:
        self._out_paused = True

    def resumeProducing(self) -> None:
        if not self._out_paused:
            return
        self._out_paused = False
        core = self.core
        if not self._lost and core is not None and not core.closed and not self._waiting:
            self._pump()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost does the rest."""

    # --- the event loop -----------------------------------------------------------------------

    def _pump(self) -> None:
        core = self.core
        out = self._out
        requests = content = 0
        while not self._waiting and not self._out_paused:
            ev = core.next_event()
            if ev is NEED_DATA or ev is PAUSED or ev is CLOSED_EVENT:
                break
            if type(ev) is DataChunk:
                content += len(ev.data)
                writer = self._writer
                writer.write(ev.data)
                scan = self._from_scan
                if scan is not None and not scan.done:
                    scan.feed(ev.data)
                mid = self._mid_scan
                if mid is not None and not mid.done:
                    mid.feed(ev.data)
                if writer.pending_bytes > MAX_WRITER_BACKLOG:
                    self._wait_for_writer()
                continue
            requests += 1
            result = self._decide(ev)
            if type(result) is not Reply:
                self._waiting = True
                self._pending_ev = ev
                self._sync_result = _UNSET
                self._in_pump = True
                result.addBoth(self._decided)
                self._in_pump = False
                if self._sync_result is _UNSET:
                    break                              # truly asynchronous: resume later
                result, self._sync_result = self._sync_result, _UNSET
                self._waiting = False
                self._pending_ev = None
                result = self._as_reply(result)
            self._send(ev, result)
            if core.closed:
                break
            if self._out_bytes >= REPLY_FLUSH_BYTES and not self._lost:
                # Hand a long pass's replies over now: the transport pauses us (the loop's
                # condition) when the client has not read what it already has.
                data = b"".join(out)
                out.clear()
                self._out_bytes = 0
                self._write(data)
        if requests or content:
            self._earned(requests, content)
        if out:
            self._out = []
            self._out_bytes = 0
            if not self._lost:
                self._write(b"".join(out))
        if core.closed and not self._lost:
            self._close()
        elif not self._waiting and not self._out_paused and self._paused and self._writer_ok():
            self._resume()

    def _earned(self, requests: int, content: int) -> None:
        """Complete commands restart the request deadline; message content earns time at
        deadline.MIN_DATA_RATE (Postfix smtpd_per_request_deadline, smtpd_min_data_rate)."""
        deadline = self._deadline
        if deadline is None:
            return
        now = self.app.reactor.seconds()
        if requests:
            deadline.request_done(now, self.app.settings.smtp.timeout)
        if content:
            deadline.moved(now, content)

    def _write(self, data: bytes) -> None:
        write_now(self.transport, data)

    def _decided(self, result: Any) -> None:
        if self._in_pump:
            self._sync_result = result
            return None
        self._waiting = False
        reply = self._as_reply(result)
        core = self.core
        if self._lost or core.closed:
            return None
        ev, self._pending_ev = self._pending_ev, None
        self._send(ev, reply)
        self._earned(1, 0)             # the client's next command has its time from now
        self._pump()
        return None

    def _send(self, ev, reply: Reply) -> None:
        data = self.core.send(reply)
        self._out.append(data)
        self._out_bytes += len(data)
        handle = self.drain
        if handle is not None:
            t = type(ev)
            if t is DataStart:
                if reply.code == 354:
                    handle.busy()          # a transfer: the drain lets it finish
            elif t is MessageEnd:
                handle.idle()              # may call close_now() when the server stops
        if type(ev) is StartTLS and reply.code == 220:
            self._start_tls()

    def _start_tls(self) -> None:
        """RFC 3207: the 220 goes out in clear, then the handshake. The core has already
        dropped whatever the client pipelined after STARTTLS, and forgets HELO and the
        transaction; the client must say EHLO again."""
        out = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        if out:
            self._write(out)
        self.transport.startTLS(self.app.tls.options())
        self.auth.tls_started()

    def _as_reply(self, result: Any) -> Reply:
        if isinstance(result, Reply):
            return result
        if isinstance(result, Failure):
            self.log.failure("internal error: rip={ip}", result, ip=self.ip)
        else:
            self.log.error("internal error: rip={ip} decision gave {r!r}", ip=self.ip, r=result)
        return TEMPORARY_FAILURE

    def _writer_ok(self) -> bool:
        return self._writer is None or self._writer.pending_bytes <= MAX_WRITER_BACKLOG

    def _wait_for_writer(self) -> None:
        """The disk is slower than the client: stop reading until the writer drains."""
        self._pause()
        if self._backlog_timer is None:
            self._backlog_timer = self.app.reactor.callLater(WRITER_BACKLOG_POLL,
                                                             self._check_writer)

    def _check_writer(self) -> None:
        self._backlog_timer = None
        if self._lost:
            return
        if self._writer_ok():
            if not self._waiting and not self._out_paused:
                self._resume()
        else:
            self._backlog_timer = self.app.reactor.callLater(WRITER_BACKLOG_POLL,
                                                             self._check_writer)

    # --- decisions ----------------------------------------------------------------------------

    def _decide(self, ev) -> Reply | Deferred:
        t = type(ev)
        if t is RcptTo:
            return self._after_rbl(self._rcpt, ev)
        if t is MessageEnd:
            return self._message_end(ev)
        if t is DataStart:
            return self._data_start(ev)
        if t is MailFrom:
            # rblsmtpd answers MAIL with 250 and refuses from RCPT on; waiting only there lets
            # the lookups overlap EHLO and MAIL's round trips.
            return self._mail(ev)
        if t is StartTLS:
            return replies.TLS_UNAVAILABLE if self.app.tls is None else ev.reply
        if t is Auth or t is AuthResponse:
            return self.auth.decide(ev)
        return ev.reply

    def _mail(self, ev: MailFrom) -> Reply | Deferred:
        self._spf = None
        refusal = self.auth.mail_refusal(ev)
        if refusal is not None:
            return refusal
        reply = ev.reply
        verifier = self.app.verifier
        if reply.code != 250 or not verifier.active or not self.ip \
                or self.relay_client().may_relay:
            return reply
        # SPF of the MAIL FROM domain (of the HELO name for <>), for mail from the internet.
        mailbox = ev.sender
        d = verifier.check_spf(self.ip, self.core.helo or "",
                               str(mailbox) if mailbox is not None else "")
        return d.addCallback(self._spf_checked, reply)

    def _spf_checked(self, result, reply: Reply) -> Reply:
        self._spf = result
        refusal = self.app.verifier.spf_refusal(result, self.ip)
        if refusal is not None:
            self.log.info("refused mail from: rip={ip}: spf={result} {domain} ({why})",
                          ip=self.ip, result=result.result, domain=result.domain,
                          why=result.reason)
            return refusal
        return reply

    def _rcpt(self, ev: RcptTo) -> Reply | Deferred:
        dest = classify(ev.path)
        lookups = self.app.lookups
        try:
            if dest.literal:
                local = relay_policy.REMOTE
            elif relay_policy.needs_user_lookup(dest):
                local = lookups.lookup_recipient(str(ev.recipient))
            else:
                local = lookups.has_domain(dest.domain)
                if isinstance(local, Deferred):
                    local.addCallback(lambda has: relay_policy.UNKNOWN if has
                                      else relay_policy.REMOTE)
                else:
                    local = relay_policy.UNKNOWN if local else relay_policy.REMOTE
        except (sqlite3.Error, OSError) as e:
            return self._lookup_failed(e)
        if isinstance(local, Deferred):
            def failed(f: Failure):
                f.trap(sqlite3.Error, OSError)
                return self._lookup_failed(f.value)
            return local.addCallbacks(self._rcpt_known, failed, callbackArgs=(ev, dest))
        return self._rcpt_known(local, ev, dest)

    def _lookup_failed(self, e: BaseException) -> Reply:
        self.log.error("recipient lookup failed: rip={ip}: {why}", ip=self.ip, why=str(e))
        return replies.LOOKUP_FAILED

    def _grant_failed(self, e: BaseException) -> None:
        self.log.error("roaming grant lookup failed: rip={ip}: {why}", ip=self.ip, why=str(e))

    def _ask_grant(self) -> bool | Deferred:
        """The roaming grant of this client: a bool, or a Deferred (PostgreSQL cache miss);
        raises or fails with OSError when it cannot be known."""
        if not self.ip or self.app.grants is None:
            return False
        return self.app.lookups.is_granted(self.ip)

    def _rcpt_known(self, local: str, ev: RcptTo, dest) -> Reply | Deferred:
        if self.app.grants is not None and not self.app.lookups.remote_grants:
            # The embedded grants file: asked at once, as always.
            return self._rcpt_decide(local, ev, dest, self.relay_client())
        client = self.relay_client(granted=False)
        if relay_policy.decide(dest, local, client).accept or \
                not relay_policy.decide(dest, local, dataclasses.replace(client, granted=True)).accept:
            return self._rcpt_decide(local, ev, dest, client)     # the grant cannot matter
        # Checked again per RCPT: a POP3 login during this session counts at once.
        try:
            granted = self._ask_grant()
        except OSError as e:
            granted = e
        if isinstance(granted, Deferred):
            def unknown(f: Failure):
                f.trap(OSError)
                return self._rcpt_granted(f.value, local, ev, dest, client)
            return granted.addCallbacks(self._rcpt_granted, unknown,
                                        callbackArgs=(local, ev, dest, client))
        return self._rcpt_granted(granted, local, ev, dest, client)

    def _rcpt_granted(self, granted, local: str, ev: RcptTo, dest,
                      client: relay_policy.RelayClient) -> Reply:
        if isinstance(granted, BaseException):
            # The verdict hangs on a grant nobody can read now: neither accept nor refuse.
            self._grant_failed(granted)
            return replies.LOOKUP_FAILED
        self._granted = bool(granted)
        return self._rcpt_decide(local, ev, dest,
                                 dataclasses.replace(client, granted=True) if granted else client)

    def _rcpt_decide(self, local: str, ev: RcptTo, dest,
                     client: relay_policy.RelayClient) -> Reply:
        verdict = relay_policy.decide(dest, local, client)
        if not verdict.accept:
            self.log.info("refused rcpt: rip={ip} rcpt=<{rcpt}>: {why} ({tricks})", ip=self.ip,
                          rcpt=str(ev.recipient), why=verdict.why,
                          tricks=",".join(sorted(dest.tricks)) or "-")
        return replies.rcpt_reply(verdict)

    def relay_client(self, granted: bool | None = None) -> relay_policy.RelayClient:
        """Who may relay now. `granted` None: the roaming grant as the grants say at once
        (the embedded file: asked; PostgreSQL: its cache, else the last answer this session
        had, which RCPT keeps fresh)."""
        core = self.core
        if granted is None:
            granted = self._granted_now()
        return relay_policy.RelayClient(
            relayclient="RELAYCLIENT" in self.env,
            authenticated=core is not None and core.authenticated,
            # Checked again per RCPT: a POP3 login during this session counts at once.
            granted=granted)

    def _granted_now(self) -> bool:
        grants = self.app.grants
        if not self.ip or grants is None:
            return False
        lookups = self.app.lookups
        if not lookups.remote_grants:
            return grants.is_granted(self.ip)
        hit = grants.peek(self.ip)
        return self._granted if hit is MISS else bool(hit)

    def _data_start(self, ev: DataStart) -> Reply:
        injector = self.app.injector
        if injector is None:
            return replies.QQ_TEMPORARY
        core = self.core
        client = self.relay_client()
        tx = enddata.Transaction(
            sender=str(core.sender) if core.sender is not None else "",
            recipients=tuple(str(r) for r in core.recipients), client_ip=self.ip,
            helo=core.helo or "", listener=self.factory.kind,
            authenticated=client.authenticated,
            relay_client=client.relayclient or client.granted, spf=self._spf,
            hostname=self.app.settings.hostname)
        self._checks = enddata.wanted(self.app.end_of_data, tx)
        if self._checks:
            # The checks need the whole message: it is held in memory (at most databytes).
            self._tx = tx
            self._writer = writer = enddata.HeldMessage()
        else:
            self._tx = None
            self._writer = writer = injector.begin()
        protocol_name = "ESMTP" if core.extended else "SMTP"   # RFC 3848 names
        if core.tls:
            protocol_name = "ESMTPS"
        if core.authenticated:
            protocol_name += "A"
        writer.write(received_header(helo=core.helo, client_ip=self.ip or "unknown",
                                     hostname=self.app.settings.hostname,
                                     when=self.app.reactor.seconds(), protocol=protocol_name))
        self._from_scan = self.auth.from_scanner()
        self._mid_scan = MessageIdScanner()
        return ev.reply

    def _message_end(self, ev: MessageEnd) -> Reply | Deferred:
        writer, self._writer = self._writer, None
        scan, self._from_scan = self._from_scan, None
        mid, self._mid_scan = self._mid_scan, None
        if writer is None:
            return ev.reply or replies.QQ_TEMPORARY
        if ev.reply is not None:
            writer.abort()
            if ev.reply.code == 451:
                self.log.info("refused message: rip={ip}: {text}", ip=self.ip, text=ev.reply.text)
            return ev.reply
        if scan is not None:
            refusal = self.auth.from_refusal(scan.finish())
            if refusal is not None:
                writer.abort()
                return refusal
        user = self.auth.user
        trace = trace_text(self.ip, self.core.helo, user.address if user is not None else None,
                           mid.message_id if mid is not None else None)
        checks, self._checks = self._checks, []
        tx, self._tx = self._tx, None
        if checks:
            # The end-of-data hook point (enddata.py): every check, then the commit.
            d = self._checking = enddata.run_checks(checks, tx, writer.data())
            writer.abort()           # the checks have the bytes now
            return d.addBoth(self._checks_ended, d).addCallback(self._checked, ev, trace)
        try:
            d = writer.commit(ev.sender, list(ev.recipients), trace)
        except ValueError as e:
            self.log.error("envelope refused by the queue: rip={ip}: {why}", ip=self.ip,
                           why=str(e))
            return replies.QQ_TEMPORARY
        return d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(writer,))

    def _checks_ended(self, result, d: Deferred):
        if self._checking is d:
            self._checking = None
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            self.log.info("client gone during the end-of-data checks: rip={ip}; checks "
                          "stopped, nothing queued", ip=self.ip)
            return enddata.Result(b"", replies.QQ_TEMPORARY)
        return result

    def _checked(self, result: enddata.Result, ev: MessageEnd, trace: str | None = None
                 ) -> Reply | Deferred:
        for note in result.notes:
            self.log.info("check: rip={ip}: {note}", ip=self.ip, note=note)
        if result.reply is not None:
            return result.reply
        if self._lost:
            # It never saw a 250 and will send again: queue nothing.
            self.log.info("client gone during the end-of-data checks: rip={ip}; nothing "
                          "queued", ip=self.ip)
            return replies.QQ_TEMPORARY
        writer = self.app.injector.begin()
        writer.write(result.message)
        try:
            d = writer.commit(ev.sender, list(ev.recipients), trace or self.ip or None)
        except ValueError as e:
            self.log.error("envelope refused by the queue: rip={ip}: {why}", ip=self.ip,
                           why=str(e))
            return replies.QQ_TEMPORARY
        return d.addCallbacks(self._committed, self._commit_failed, callbackArgs=(writer,))

    def _committed(self, qid, writer=None) -> Reply:
        self.messages += 1
        self.factory.count_message()
        # The id the log shows (queue/naming.py message_name), never reused between messages.
        name = getattr(writer, "name", None) or str(qid)
        return replies.queued(int(self.app.reactor.seconds()), name)

    def _commit_failed(self, failure: Failure) -> Reply:
        if failure.check(QueueWriteError):
            self.log.error("qq write error: rip={ip}: {why}", ip=self.ip,
                           why=failure.getErrorMessage())
            return replies.QQ_WRITE_ERROR
        self.log.failure("commit failed: rip={ip}", failure, ip=self.ip)
        return replies.QQ_TEMPORARY

    # --- DNSBL (rblsmtpd) ---------------------------------------------------------------------

    def _start_dnsbl(self) -> None:
        dnsbl = self.app.dnsbl
        if dnsbl is None or not self.ip:
            return
        self._rbl = _UNSET
        self._rbl_waiters = []
        try:
            d = dnsbl.check(self.ip, self.env)
        except Exception:
            self.log.failure("rblsmtpd: {ip}: check raised; not checked", ip=self.ip)
            d = defer.succeed(None)
        d.addErrback(self._rbl_error)
        d.addCallback(self._rbl_verdict)

    def _rbl_error(self, failure: Failure) -> None:
        self.log.failure("rblsmtpd: {ip}: check failed; not checked", failure, ip=self.ip)
        return None

    def _rbl_verdict(self, refusal) -> None:
        self._rbl = refusal
        waiters, self._rbl_waiters = self._rbl_waiters or [], None
        for w in waiters:
            w.callback(refusal)

    def _after_rbl(self, decide, ev) -> Reply | Deferred:
        """Apply the DNSBL verdict first (waiting for it if the lookups still run)."""
        rbl = self._rbl
        if rbl is None or self.core.authenticated:
            return decide(ev)      # users who logged in are not judged by their address
        if rbl is _UNSET:
            d: Deferred = Deferred()
            self._rbl_waiters.append(d)
            return d.addCallback(lambda refusal: self._rbl_reply(refusal) or decide(ev))
        return self._rbl_reply(rbl)

    @staticmethod
    def _rbl_reply(refusal) -> Reply | None:
        if refusal is None:
            return None
        return replies.dnsbl_refusal(refusal.permanent, refusal.text)


class _SessionView:
    """smtp/submission.py's `SessionView` of one session: what SessionAuth may see, read live
    from the protocol and its app (a reload reaches the next check), and nothing else."""

    __slots__ = ("_proto",)

    def __init__(self, proto: SMTPServerProtocol) -> None:
        self._proto = proto

    @property
    def kind(self) -> str:
        return self._proto.factory.kind

    @property
    def ip(self) -> str:
        return self._proto.ip

    @property
    def core(self) -> ServerConnection:
        return self._proto.core

    @property
    def tls_available(self) -> bool:
        return self._proto.app.tls is not None

    @property
    def settings(self):
        return self._proto.app.settings

    @property
    def reactor(self):
        return self._proto.app.reactor

    @property
    def authenticator(self):
        return self._proto.app.authenticator

    @property
    def penalty(self) -> login_penalty.LoginPenalty:
        return self._proto.app.login_penalty

    def may_relay(self) -> bool:
        return self._proto.relay_client().may_relay

    def get_alias(self, address: str) -> list[str] | None:
        return self._proto.app.store.get_alias(address)


def _greetdelay(env: Mapping[str, str]) -> float:
    text = env.get("GREETDELAY", env.get("SMTPD_GREETDELAY", ""))
    try:
        value = float(text)
    except ValueError:
        return 0.0
    if value != value:     # NaN
        return 0.0
    return max(0.0, min(value, MAX_GREETDELAY))
