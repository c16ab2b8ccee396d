"""Twisted clients for clamd (INSTREAM) and rspamd (/checkv2), over any endpoint string.

Each call is one connection: connect, send the request as a pull producer (the next piece is
written only when the previous one left the socket buffer, so a 25 MiB message costs one
64 KiB piece of extra memory, not a second copy in Twisted's write buffer), read one reply,
close. Everything runs on the reactor; nothing blocks, so a scan in progress never delays
another session. One deadline per call covers connecting, sending and waiting for the answer;
when it passes the connection is aborted and the call answers ScanFailure. The Deferreds never
fail (cancelling one aborts its connection).

The endpoint text is Twisted's client endpoint syntax ("unix:/run/clamav/clamd.ctl",
"tcp:127.0.0.1:3310"); a bare absolute path means a unix socket.
"""

from __future__ import annotations

from typing import Callable, Iterator

from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mailappliance.scan import clamd, rspamd
from mailappliance.scan.endpoints import endpoint_description
from mailappliance.scan.interfaces import (
    ISpamScorer, IVirusScanner, Message, ScanEnvelope, ScanFailure, as_chunks, batches,
    message_size)

# Seconds for one scan when the caller does not say ([scan] timeout's default, DESIGN.md).
DEFAULT_TIMEOUT = 30.0
# Bytes written per producer turn: one INSTREAM chunk (clamd.FRAME_BYTES). A small message
# goes out in a single write (command, its one chunk and the end marker together).
WRITE_BYTES = clamd.FRAME_BYTES
# rspamd's HTTP body pieces, the same size for the same reason.
BODY_BYTES = 64 * 1024
# Transports whose socket _send_now may write to directly (no TLS, no wrapping).
_PLAIN_CLIENTS = (unix.Client, tcp.Client)


_MORE = object()     # reply_data: the reply is not complete yet


def _send_now(transport, data: bytes) -> None:
    """transport.write, but sent at once when the socket takes it (as mailappliance/netwrite.py
    does for the server side): a plain client transport with nothing queued."""
    t = transport
    if (type(t) in _PLAIN_CLIENTS and t.connected and not t.disconnecting
            and not t._writeDisconnected and t.producer is None and not t._tempDataBuffer
            and t.offset == len(t.dataBuffer)):
        try:
            sent = t.socket.send(data)
        except OSError:
            sent = 0            # EAGAIN or an error: transport.write finds out
        if sent == len(data):
            return
        data = data[sent:]
    t.write(data)


@implementer(IPullProducer)
class _Exchange(Protocol):
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

    def stopProducing(self) -> None:
        self._producing = False

    def _stop_producing(self) -> None:
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()

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


class _OneShot(Factory):
    """Hands out the one protocol of a call. Not `noisy`: Twisted's factories log "Starting
    factory" and "Stopping factory" per connection, two log lines per scanned message."""

    noisy = False

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr) -> Protocol:
        return self.proto


class _Call:
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

    def finish(self, result) -> None:
        if self.done:
            return
        self.done = True
        self._close()
        self.result.callback(result)

    def _cancel(self, d: Deferred) -> None:
        # The caller gave up: close everything; Deferred then fails with CancelledError.
        if not self.done:
            self.done = True
            self._close()


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
    """clamd over its INSTREAM command."""

    name = "clamd"

    def scan(self, message: Message) -> Deferred:
        chunks = as_chunks(message)
        return self._start(lambda call: _InstreamExchange(clamd.instream_frames(chunks), call))

    def ping(self) -> Deferred:
        return self._start(lambda call: _InstreamExchange(
            iter([[clamd.PING]]), call, parse=clamd.parse_ping_reply))


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

