"""`write_now(transport, data)`: Twisted's transport.write, but sent at once when it can be;
`close_now(transport)`: its loseConnection, without a trip through epoll when nothing waits.

Twisted's write() only queues the bytes and registers for writability: they leave in the next
reactor iteration, after two epoll_ctl calls. A line protocol without pipelining (SMTP from
smtp-source, POP3 from fetchmail or poplib) is one reply per round trip, so that costs every
command a reactor iteration of latency and about a tenth of the reactor's time under load.
Sending directly (what asyncio's transports do) keeps the order of bytes: it is only done on
a plain TCP transport whose buffer is empty and that has no producer, or a streaming producer
that is not paused (the sessions register themselves as one to learn when a peer stops reading
their replies; see REPLY_FLUSH_BYTES); whatever the kernel does not take, and every other case,
goes through transport.write as usual, which pauses that producer when the buffer fills.
"""

from __future__ import annotations

from twisted.internet import main, tcp
from twisted.python import failure

# The bound on replies a peer has not read (docs/LIMITS.md): every session (SMTP, submission,
# POP3, admin) is its transport's streaming producer for its whole life, so Twisted pauses it
# when more than the transport's bufferSize (FileDescriptor.bufferSize, 64 KiB) waits unsent,
# and resumes it when all of it has left. While paused a session reads nothing and answers
# nothing, so a client that pipelines commands and never reads costs at most that buffer plus
# one pass of replies. A pass hands its replies to the transport every REPLY_FLUSH_BYTES, so a
# pause takes effect within a pass too (64 KiB of pipelined `EHLO x` would otherwise be answered
# with 1.3 MB in one write). 16 KiB: Twisted's SEND_LIMIT/8, a handful of large EHLO or CAPA
# answers, still one system call per round trip for every real client.
REPLY_FLUSH_BYTES = 16 * 1024


def write_now(transport, data: bytes) -> None:
    t = transport
    if (type(t) is tcp.Server and not t.TLS and t.connected and not t.disconnecting
            and not t._writeDisconnected
            and (t.producer is None or (t.streamingProducer and not t.producerPaused))
            and _nothing_waits(t)):
        send_then_write(t, data)
    else:
        t.write(data)


def _nothing_waits(t) -> bool:
    return not t._tempDataBuffer and t.offset == len(t.dataBuffer)


def close_now(transport) -> None:
    """transport.loseConnection(), without the trip through epoll when nothing waits unsent.

    Twisted's loseConnection always registers for writability and closes when epoll reports
    it, in a later iteration: three epoll_ctl calls, an event dispatched, and a shutdown(2)
    that fails once the peer has closed first (an SMTP client after 221). With an empty
    buffer and no producer there is nothing to flush, so the socket stops being read now and
    is closed from a timer of the next reactor turn (never inside the caller: a protocol's
    connectionLost must not run within its own dataReceived). Bytes written in between are
    still sent first: the close then takes Twisted's usual path."""
    t = transport
    if (type(t) is not tcp.Server or t.TLS or not t.connected or t.disconnecting
            or t._writeDisconnected or t.producer is not None or not _nothing_waits(t)):
        t.loseConnection()
        return
    t.stopReading()
    t.disconnecting = 1
    t._shouldShutdown = False        # close(2) alone sends the FIN after what was sent
    t.reactor.callLater(0, _close_quiet, t)


def _close_quiet(t) -> None:
    if not t.connected:
        return                       # aborted or reset meanwhile: already closed
    if not _nothing_waits(t):
        t.startWriting()             # written after close_now: doWrite flushes, then closes
        return
    t.stopWriting()
    t.connectionLost(failure.Failure(main.CONNECTION_DONE))


def send_then_write(t, data: bytes) -> None:
    """What the socket of `t` takes now, the rest through t.write (the caller has checked that
    nothing waits in t's buffer, so the order of bytes is kept)."""
    try:
        sent = t.socket.send(data)
    except OSError:
        sent = 0            # EAGAIN or an error: transport.write finds out
    if sent != len(data):
        t.write(data[sent:])
