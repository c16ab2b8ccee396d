"""Twisted clients for clamd (INSTREAM) and rspamd (/checkv2), over any endpoint string.

clamd scans go over IDSESSION connections (clamd(8)): a scan takes an idle session connection
if there is one, else opens a new one, sends INSTREAM, reads the one reply ("<n>: stream: OK")
and gives the connection back for the next scan. One scan at a time per connection, so a
broken or hung connection fails only its own scan. That saves the connect, clamd's accept and
the close per message (about a third of our cost per scan with a small message). A connection
that served a scan before and ends without a single reply byte (clamd closed it between scans:
a restart, its own idle limit) is retried once on a new connection; anything else is the
scan's answer. Idle connections are closed after SESSION_IDLE_SECONDS.

The request goes out as scatter-gather writes of the message's own bytes (socket.sendmsg of
memoryview slices: no copy, no join) while the socket takes it, which for every message up to
the socket buffer (about 200 KiB on Linux) means one system call and no reactor turn. What the
socket does not take goes through Twisted's buffer one 64 KiB piece at a time as a pull
producer (the next piece only when the last left), so a 25 MiB message costs one piece of
extra memory, not a second copy.

rspamd calls (and PING) are one connection each: connect, send, read one reply, close.

Everything runs on the reactor; nothing blocks, so a scan in progress never delays another
session. One deadline per call covers connecting, sending and waiting for the answer; when it
passes the connection is aborted and the call answers ScanFailure. The Deferreds never fail
(cancelling one aborts its connection).

The endpoint text is Twisted's client endpoint syntax ("unix:/run/clamav/clamd.ctl",
"tcp:127.0.0.1:3310"); a bare absolute path means a unix socket.
"""

from __future__ import annotations

from itertools import chain
from types import MethodType
from typing import Callable, Iterator

from twisted.internet import defer, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mailappliance.netwrite import send_then_write
from mailappliance.scan import clamd, rspamd
from mailappliance.scan.endpoints import endpoint_description
from mailappliance.scan.interfaces import (
    ISpamScorer, IVirusScanner, Message, ScanEnvelope, ScanFailure, VirusReport, as_chunks,
    batches, message_size)

# Seconds for one scan when the caller does not say ([scan] timeout's default, DESIGN.md).
DEFAULT_TIMEOUT = 30.0
# Bytes written per producer turn: one INSTREAM chunk (clamd.FRAME_BYTES). A small message
# goes out in a single write (command, its one chunk and the end marker together).
WRITE_BYTES = clamd.FRAME_BYTES
# rspamd's HTTP body pieces, the same size for the same reason.
BODY_BYTES = 64 * 1024
# Transports whose socket _send_now may write to directly (no TLS, no wrapping).
_PLAIN_CLIENTS = (unix.Client, tcp.Client)
# Buffers per sendmsg call: Linux's IOV_MAX is 1024; a piece of WRITE_BYTES from a message
# in many small chunks stays below this many.
MAX_IOV = 512
# Idle clamd session connections kept for the next scans. Each connection serves one scan at
# a time, so this many concurrent scans skip the connect; beyond it a connection is closed
# after its scan. Above clamd's default MaxThreads (10; Debian ships 12): more scans at once
# than that only queue inside clamd. Each is one descriptor here and one in clamd.
MAX_IDLE_SESSIONS = 16
# Seconds an idle session connection is kept. Below the smallest CommandReadTimeout in
# clamd's shipped configurations (5 s in older ones, 30 s now), so we never send on a
# connection clamd is about to drop for idleness; and a quiet server holds no clamd
# connections for long.
SESSION_IDLE_SECONDS = 4.0


_MORE = object()     # reply_data: the reply is not complete yet


def _drained(t) -> bool:
    """Is a plain transport connected with nothing in Twisted's write buffer? Then bytes
    written straight to its socket keep their order."""
    return (t.connected and not t.disconnecting and not t._writeDisconnected
            and not t._tempDataBuffer and t.offset == len(t.dataBuffer))


def _send_now(transport, data: bytes) -> None:
    """transport.write, but sent at once when the socket takes it (as mailappliance/netwrite.py
    does for the server side): a plain client transport with nothing queued."""
    t = transport
    if type(t) in _PLAIN_CLIENTS and t.producer is None and _drained(t):
        send_then_write(t, data)
    else:
        t.write(data)


@implementer(IPullProducer)
class _Pushing(Protocol):
    """A protocol that is its transport's producer while a request is still being written
    (`_producing`): stopped by the transport, or by itself once everything is sent."""

    _producing = False

    def stopProducing(self) -> None:
        self._producing = False

    def _stop_producing(self) -> None:
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()


class _Exchange(_Pushing):
    """One request and one reply. Subclasses say what a reply chunk or the close means."""

    def __init__(self, pieces: Iterator[list], call: "_Call") -> None:
        self._pieces = pieces
        self._call = call
        self.sent_all = False
        self._producing = False

    def connectionMade(self) -> None:
        if self._call.done:
            self.transport.abortConnection()
            return
        first: list = []
        size = 0
        for piece in self._pieces:
            first.extend(piece)
            size += sum(len(p) for p in piece)
            if size >= WRITE_BYTES:
                break
        else:
            # The whole request fits one write (every message up to ~64 KiB): send it now,
            # without a producer and without waiting a reactor turn for writability.
            self.sent_all = True
            _send_now(self.transport, b"".join(first))
            return
        self.transport.writeSequence(first)
        self._producing = True
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if not self._producing:
            return
        written = 0
        out: list = []
        for piece in self._pieces:
            out.extend(piece)
            written += sum(len(p) for p in piece)
            if written >= WRITE_BYTES:
                break
        else:
            self.sent_all = True
        if out:
            self.transport.writeSequence(out)
        if self.sent_all:
            self._stop_producing()


    def dataReceived(self, data: bytes) -> None:
        if self._call.done:
            return
        result = self.reply_data(data)
        if result is not _MORE:
            self._call.finish(result)

    def connectionLost(self, reason: Failure) -> None:
        self._producing = False
        if not self._call.done:
            self._call.finish(self.closed())

    def reply_data(self, data: bytes):
        """The result once the reply is complete, else _MORE."""
        raise NotImplementedError

    def closed(self):
        raise NotImplementedError


class _InstreamExchange(_Exchange):
    def __init__(self, pieces, call, parse: Callable = clamd.parse_instream_reply) -> None:
        super().__init__(pieces, call)
        self.reader = clamd.ReplyReader()
        self.parse = parse

    def reply_data(self, data: bytes):
        line = self.reader.feed(data)
        if line is not None:
            return self.parse(line)
        if self.reader.overflow:
            return clamd.closed_without_reply(self.reader, self.sent_all)
        return _MORE

    def closed(self):
        return clamd.closed_without_reply(self.reader, self.sent_all)


class _HTTPExchange(_Exchange):
    def __init__(self, pieces, call, parse: Callable) -> None:
        super().__init__(pieces, call)
        self.reader = rspamd.ResponseReader()
        self.parse = parse

    def reply_data(self, data: bytes):
        got = self.reader.feed(data)
        if got is None:
            return _MORE
        if isinstance(got, ScanFailure):
            return got
        return self.parse(*got)

    def closed(self):
        got = self.reader.eof()
        if isinstance(got, ScanFailure):
            return got
        return self.parse(*got)


def _take(buffers: Iterator, limit: int) -> list:
    """The next buffers of a request, about `limit` bytes (at least one buffer)."""
    out: list = []
    size = 0
    for b in buffers:
        out.append(b)
        size += len(b)
        if size >= limit or len(out) >= MAX_IOV:
            break
    return out


def _consume(batch: list, sent: int) -> None:
    """Drop the first `sent` bytes of a list of buffers (the part the socket took)."""
    i = 0
    while sent:
        n = len(batch[i])
        if sent >= n:
            sent -= n
            i += 1
        else:
            batch[i] = memoryview(batch[i])[sent:]
            sent = 0
    del batch[:i]


@implementer(IPullProducer)
class _Session(_Pushing):
    """One clamd IDSESSION connection. It serves one scan (`call`) at a time; in between it
    waits in its scanner's idle list."""

    def __init__(self, scanner: "ClamdScanner", call: "_ScanCall") -> None:
        self.scanner = scanner
        self.call: _ScanCall | None = call
        self.number = 0                   # commands sent in this session (clamd counts too)
        self.reader = clamd.ReplyReader()
        self.sent_all = False
        self.answered = False             # a reply byte came for the current command
        self.idle_since = 0.0
        self.lost = False
        self.on_lost: Deferred | None = None     # ClamdScanner.close waits on it
        self._buffers: Iterator | None = None
        self._batch: list = []
        self._producing = False

    def connectionMade(self) -> None:
        call = self.call
        if call is None or call.done:
            self.transport.abortConnection()
            return
        t = self.transport
        if type(t) is unix.Client:
            # Twisted's unix transport reads with recvmsg, for descriptors passed along;
            # clamd passes none, and a plain recv costs a third as much per reply.
            t.doRead = MethodType(tcp.Connection.doRead, t)
        self._send(call, opening=True)

    def serve(self, call: "_ScanCall") -> None:
        """The next scan on this (idle) connection."""
        self.call = call
        self._send(call, opening=False)

    def _send(self, call: "_ScanCall", opening: bool) -> None:
        self.number += 1
        self.reader = clamd.ReplyReader()
        self.sent_all = self.answered = False
        request = clamd.instream_request(call.chunks)
        self._buffers = chain((clamd.IDSESSION,), request) if opening else request
        self._push()

    def _push(self) -> None:
        """Write the request on: straight to the socket (sendmsg, no copy) while it takes it,
        the rest through Twisted's buffer one piece at a time (resumeProducing)."""
        t = self.transport
        direct = type(t) in _PLAIN_CLIENTS
        while True:
            batch = self._batch
            if not batch:
                batch = self._batch = _take(self._buffers or (), WRITE_BYTES)
                if not batch:
                    self.sent_all = True
                    self._buffers = None
                    self._stop_producing()
                    return
            if direct and _drained(t):
                try:
                    sent = t.socket.sendmsg(batch)
                except OSError:
                    sent = 0     # EAGAIN, or an error Twisted's own write will report
                if sent:
                    _consume(batch, sent)
                    if not batch:
                        continue
            t.writeSequence([b if type(b) is bytes else bytes(b) for b in batch])
            self._batch = []
            if not self._producing:
                self._producing = True
                t.registerProducer(self, False)
            return

    def resumeProducing(self) -> None:
        if self._producing:
            self._push()


    def dataReceived(self, data: bytes) -> None:
        call = self.call
        if call is None:                   # clamd speaks unasked: close, trust it no more
            self.transport.abortConnection()
            return
        self.answered = True
        reader = self.reader
        line = reader.feed(data)
        if line is None:
            if reader.overflow:
                self._end(call, clamd.closed_without_reply(reader, self.sent_all))
            return
        result = clamd.parse_session_reply(line, self.number)
        clean = (type(result) is VirusReport and self.sent_all
                 and len(reader.partial) == len(line) + 1)      # nothing after the reply
        self._end(call, result, keep=clean)

    def _end(self, call: "_ScanCall", result, keep: bool = False) -> None:
        self.call = None
        self._batch = []
        self._buffers = None
        self._stop_producing()
        if keep:
            self.scanner._release(self)
        else:
            self.transport.abortConnection()
        call.finish(result)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        self._producing = False
        self.scanner._forget(self)
        call, self.call = self.call, None
        if call is not None and not call.done:
            retry = self.number > 1 and not self.answered
            call.lost(clamd.closed_without_reply(self.reader, self.sent_all), retry)


class _Deadlined:
    """What a clamd scan (_ScanCall) and a one-connection call (_Call) share: the connect
    callbacks, the deadline, finishing once, cancelling. Subclasses set `client`, `done`,
    `connecting`, `deadline` and `result`, and say what closing means (`_close`)."""

    client: "_Client"

    def _connected(self, proto) -> None:
        self.connecting = None
        return None

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if not self.done:
            why = failure.getErrorMessage()
            self.finish(ScanFailure(f"cannot connect to {self.client.name}: {why}"))
        return None

    def _expire(self) -> None:
        self.deadline = None
        if not self.done:
            self.finish(ScanFailure(f"no answer within {self.client.timeout:g} s"))

    def finish(self, result) -> None:
        if self.done:
            return
        self.done = True
        self._close()
        self.result.callback(result)

    def _close(self) -> None:
        raise NotImplementedError

    def _cancel(self, d: Deferred) -> None:
        # The caller gave up (the SMTP client left): close the connection; the Deferred then
        # fails with CancelledError.
        if not self.done:
            self.done = True
            self._close()


class _ScanCall(_Deadlined):
    """One scan: an idle session connection or a new one, the deadline, the result."""

    def __init__(self, scanner: "ClamdScanner", chunks) -> None:
        self.client = scanner
        self.chunks = chunks
        self.done = False
        self.retried = False
        self.session: _Session | None = None
        self.connecting: Deferred | None = None
        self.result: Deferred = Deferred(self._cancel)
        self.deadline = scanner.reactor.callLater(scanner.timeout, self._expire)
        self._attach(scanner._take_idle())

    def _attach(self, session: "_Session | None") -> None:
        if session is not None:
            self.session = session
            session.serve(self)
            return
        self.session = session = _Session(self.client, self)
        try:
            connecting = self.client.endpoint.connect(_OneShot(session))
        except Exception as e:                       # a broken endpoint must not break SMTP
            self.finish(ScanFailure(f"cannot connect to {self.client.name}: {e}"))
            return
        self.connecting = connecting
        connecting.addCallbacks(self._connected, self._connect_failed)

    def lost(self, failure: ScanFailure, retry: bool) -> None:
        """The session connection ended before the answer. `retry`: it was a reused
        connection that had said nothing to this scan -- closed between scans -- so a new
        connection gets one more try, within the same deadline."""
        if retry and not self.retried:
            self.retried = True
            self.session = None
            self._attach(None)
            return
        self.finish(failure)

    def _close(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        session, self.session = self.session, None
        connecting, self.connecting = self.connecting, None
        if session is not None and session.call is self:
            # Given up before the answer (deadline, cancel): this connection is spent.
            session.call = None
            if session.transport is not None:
                session.transport.abortConnection()
            elif connecting is not None:
                connecting.cancel()


class _OneShot(Factory):
    """Hands out the one protocol of a call. Not `noisy`: Twisted's factories log "Starting
    factory" and "Stopping factory" per connection, two log lines per scanned message."""

    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr) -> Protocol:
        return self.proto


class _Call(_Deadlined):
    """One connection's lifetime: connect, exchange, deadline, result."""

    def __init__(self, client: "_Client", make: Callable[["_Call"], _Exchange]) -> None:
        self.client = client
        self.done = False
        self.proto: _Exchange | None = None
        self.result: Deferred = Deferred(self._cancel)
        reactor = client.reactor
        self.deadline = reactor.callLater(client.timeout, self._expire)
        self.proto = make(self)
        try:
            self.connecting: Deferred | None = client.endpoint.connect(_OneShot(self.proto))
        except Exception as e:                       # a broken endpoint must not break SMTP
            self.connecting = None
            self.finish(ScanFailure(f"cannot connect to {client.name}: {e}"))
            return
        self.connecting.addCallbacks(self._connected, self._connect_failed)

    def _close(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        proto = self.proto
        connecting, self.connecting = self.connecting, None
        if proto is not None and proto.transport is not None:
            proto.transport.abortConnection()
        elif connecting is not None:
            connecting.cancel()


class _Client:
    name = "scanner"

    def __init__(self, endpoint: str, reactor, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.reactor = reactor
        self.timeout = float(timeout)
        self.endpoint_text = endpoint
        self.endpoint = clientFromString(reactor, endpoint_description(endpoint))

    def _start(self, make) -> Deferred:
        return _Call(self, make).result


@implementer(IVirusScanner)
class ClamdScanner(_Client):
    """clamd over INSTREAM in IDSESSION connections, kept between scans (module docstring)."""

    name = "clamd"

    def __init__(self, endpoint: str, reactor, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(endpoint, reactor, timeout=timeout)
        self._idle: list[_Session] = []          # most recently used last
        self._reaper = None                      # the timer that closes stale idle ones
        self._closed = False

    def scan(self, message: Message) -> Deferred:
        return _ScanCall(self, as_chunks(message)).result

    def ping(self) -> Deferred:
        return self._start(lambda call: _InstreamExchange(
            iter([[clamd.PING]]), call, parse=clamd.parse_ping_reply))

    def close(self) -> Deferred:
        """Close the idle connections (scans under way finish and close theirs); fires when
        they are gone. For a reload that replaces this client, and for tests."""
        self._closed = True
        if self._reaper is not None and self._reaper.active():
            self._reaper.cancel()
        self._reaper = None
        idle, self._idle = self._idle, []
        waits = []
        for session in idle:
            done: Deferred = Deferred()
            session.on_lost = done
            waits.append(done)
            session.transport.loseConnection()
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # --- the idle list ----------------------------------------------------------------------

    def _take_idle(self) -> "_Session | None":
        idle = self._idle
        if not idle:
            return None
        now = self.reactor.seconds()
        while idle:
            session = idle.pop()
            if not session.lost and now - session.idle_since < SESSION_IDLE_SECONDS:
                return session
            session.transport.loseConnection()
        return None

    def _release(self, session: _Session) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE_SESSIONS:
            session.transport.loseConnection()
            return
        session.idle_since = self.reactor.seconds()
        self._idle.append(session)
        if self._reaper is None:
            self._reaper = self.reactor.callLater(SESSION_IDLE_SECONDS, self._reap)

    def _forget(self, session: _Session) -> None:
        if session in self._idle:
            self._idle.remove(session)
        done, session.on_lost = session.on_lost, None
        if done is not None:
            done.callback(None)

    def _reap(self) -> None:
        """Close the connections idle for SESSION_IDLE_SECONDS; come back for the rest."""
        self._reaper = None
        now = self.reactor.seconds()
        keep = []
        for session in self._idle:
            if now - session.idle_since >= SESSION_IDLE_SECONDS:
                session.transport.loseConnection()
            else:
                keep.append(session)
        self._idle = keep
        if keep:
            wait = keep[0].idle_since + SESSION_IDLE_SECONDS - now
            self._reaper = self.reactor.callLater(max(wait, 0.0), self._reap)


@implementer(ISpamScorer)
class RspamdScorer(_Client):
    """rspamd's normal worker over HTTP /checkv2."""

    name = "rspamd"

    def score(self, message: Message, envelope: ScanEnvelope) -> Deferred:
        chunks = as_chunks(message)
        head = rspamd.check_request(message_size(chunks), envelope)

        def pieces() -> Iterator[list]:
            yield [head]
            for _, parts in batches(chunks, BODY_BYTES):
                yield parts

        return self._start(lambda call: _HTTPExchange(pieces(), call, rspamd.parse_check_reply))

    def ping(self) -> Deferred:
        return self._start(lambda call: _HTTPExchange(
            iter([[rspamd.PING_REQUEST]]), call, rspamd.parse_ping_reply))

