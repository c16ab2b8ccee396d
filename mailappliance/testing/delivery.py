"""Fakes of delivery's seams (mailappliance/delivery/interfaces.py), for the queue manager's
tests and anyone else who needs a deliverer or a message source without the real ones.

- `FakeLocalDeliverer` (ILocalDeliverer) and `FakeRemoteDeliverer` (IRemoteDeliverer): record
  each call, answer from a script (address -> Result, or a callable returning one), succeed
  by default with qmail's wording, and with ``hold = True`` keep the Deferreds for the test
  to fire.  Each call's message source is recorded too, so a test can check what the queue
  manager handed over.
- `MemoryMessageSource` (IMessageSource) and `BytesReader` (IMessageReader): messages held in
  memory by queue id.

tests/adapters/test_delivery_interfaces.py checks each with zope.interface.verify.verifyObject.
"""

from __future__ import annotations

from typing import Iterator

from twisted.internet import defer
from zope.interface import implementer

from mailappliance.delivery.interfaces import (
    ILocalDeliverer, IMessageReader, IMessageSource, IRemoteDeliverer)
from mailappliance.envelope import Envelope, success

LOCAL_SUCCESS = "did 1+0+0/"
REMOTE_SUCCESS = "127.0.0.1 accepted message./Remote host said: 250 ok/"


class _Scripted:
    def __init__(self) -> None:
        self.script: dict = {}                    # address -> Result or callable -> Result
        self.hold = False
        self.held: list[defer.Deferred] = []
        self.sources: list = []                   # the message source of each call

    def _answer(self, address: str, default: str):
        r = self.script.get(address, success(default))
        return r() if callable(r) else r


@implementer(ILocalDeliverer)
class FakeLocalDeliverer(_Scripted):
    """`calls`: (qid, address) per delivery, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, str]] = []
        self.flushes: list[int] = []

    def deliver(self, env: Envelope, index: int, messages) -> defer.Deferred:
        addr = env.recipients[index].address
        self.calls.append((env.qid, addr))
        self.sources.append(messages)
        if self.hold:
            d = defer.Deferred()
            self.held.append(d)
            return d
        return defer.succeed(self._answer(addr, LOCAL_SUCCESS))

    def flush(self) -> None:
        """Records how many deliveries were held when the queue called it."""
        self.flushes.append(len(self.held))


@implementer(IRemoteDeliverer)
class FakeRemoteDeliverer(_Scripted):
    """`calls`: (qid, [addresses]) per transaction, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, list[str]]] = []

    def deliver(self, env: Envelope, indices: list[int], messages) -> defer.Deferred:
        addrs = [env.recipients[i].address for i in indices]
        self.calls.append((env.qid, addrs))
        self.sources.append(messages)
        if self.hold:
            d = defer.Deferred()
            self.held.append(d)
            return d
        return defer.succeed([self._answer(a, REMOTE_SUCCESS) for a in addrs])


@implementer(IMessageReader)
class BytesReader:
    """An IMessageReader over bytes in memory."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024) -> None:
        self._data = data
        self._pos = 0
        self._chunk = chunk
        self.size = len(data)
        self.closed = False

    def read(self, n: int | None = None) -> bytes:
        n = self._chunk if n is None else n
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def close(self) -> None:
        self.closed = True

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self.read()
            if not chunk:
                return
            yield chunk

    def __enter__(self) -> "BytesReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@implementer(IMessageSource)
class MemoryMessageSource:
    """Messages by queue id (`messages[qid] = bytes`); as the queue store does, the bytes an
    envelope still carries (``env.data``) are served first. `opened` lists every reader
    handed out, so a test can check they were closed."""

    def __init__(self, messages: dict[int, bytes] | None = None) -> None:
        self.messages: dict[int, bytes] = dict(messages or {})
        self.opened: list[BytesReader] = []

    def read_message(self, env: Envelope) -> bytes:
        if env.data is not None:
            return env.data
        return self.messages[env.qid]

    def open_message(self, env: Envelope) -> BytesReader:
        reader = BytesReader(self.messages[env.qid])
        self.opened.append(reader)
        return reader
