"""`write_now(transport, data)`: Twisted's transport.write, but sent at once when it can be.

Twisted's write() only queues the bytes and registers for writability: they leave in the next
reactor iteration, after two epoll_ctl calls. A line protocol without pipelining (SMTP from
smtp-source, POP3 from fetchmail or poplib) is one reply per round trip, so that costs every
command a reactor iteration of latency and about a tenth of the reactor's time under load.
Sending directly (what asyncio's transports do) keeps the order of bytes: it is only done on
a plain TCP transport whose buffer is empty and that has no producer; whatever the kernel does
not take, and every other case, goes through transport.write as usual.
"""

from __future__ import annotations

from twisted.internet import tcp


def write_now(transport, data: bytes) -> None:
    t = transport
    if (type(t) is tcp.Server and not t.TLS and t.connected and not t.disconnecting
            and not t._writeDisconnected and t.producer is None
            and not t._tempDataBuffer and t.offset == len(t.dataBuffer)):
        try:
            sent = t.socket.send(data)
        except OSError:
            sent = 0            # EAGAIN or an error: transport.write finds out
        if sent == len(data):
            return
        data = data[sent:]
    t.write(data)
