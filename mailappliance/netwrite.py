"""`write_now(transport, data)`: Twisted's transport.write, but sent at once when it can be.

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

from twisted.internet import tcp

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
            and not t._tempDataBuffer and t.offset == len(t.dataBuffer)):
        send_then_write(t, data)
    else:
        t.write(data)


def send_then_write(t, data: bytes) -> None:
    """What the socket of `t` takes now, the rest through t.write (the caller has checked that
    nothing waits in t's buffer, so the order of bytes is kept)."""
    try:
        sent = t.socket.send(data)
    except OSError:
        sent = 0            # EAGAIN or an error: transport.write finds out
    if sent != len(data):
        t.write(data[sent:])
