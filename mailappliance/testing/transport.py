"""`BufferedStringTransport`: a StringTransport that pushes back on its producer the way a real
TCP transport does (twisted.internet.abstract.FileDescriptor), for adapter tests of the bound
on unread replies (netwrite.REPLY_FLUSH_BYTES, docs/LIMITS.md).

Bytes written stay "unsent" until the test calls `drain()` (the client read them). While more
than `bufferSize` bytes are unsent, a registered streaming producer is paused, as
FileDescriptor._maybePauseProducer does; `drain()` resumes it, as FileDescriptor.doWrite does
once its buffer is empty. A pull producer is asked for more at each drain. `pauseProducing` /
`resumeProducing` (our reading) are recorded in `producerState` by StringTransport itself.
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import StringTransport


class BufferedStringTransport(StringTransport):
    bufferSize = FileDescriptor.bufferSize

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unsent = 0
        self.producerPaused = False
        self.drained = 0                 # bytes the client has read in all

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unsent += len(data)
        self._maybe_pause()

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def _maybe_pause(self) -> None:
        if (self.producer is not None and self.streaming and not self.producerPaused
                and self.unsent > self.bufferSize):
            self.producerPaused = True
            self.producer.pauseProducing()

    def registerProducer(self, producer, streaming) -> None:
        super().registerProducer(producer, streaming)
        self.producerPaused = False
        if not streaming:
            producer.resumeProducing()     # FileDescriptor asks a pull producer at once

    def unregisterProducer(self) -> None:
        super().unregisterProducer()
        self.producerPaused = False

    def drain(self) -> bytes:
        """The client reads everything: returns it, and resumes the producer as the reactor
        would once the buffer is empty."""
        data = self.value()
        self.clear()
        self.drained += len(data)
        self.unsent = 0
        producer = self.producer
        if producer is not None and (not self.streaming or self.producerPaused):
            self.producerPaused = False
            producer.resumeProducing()
        return data
