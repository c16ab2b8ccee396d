"""clamd's INSTREAM and PING, sans-IO: the bytes to send and the meaning of the answer.

clamd's protocol (clamd(8), "COMMANDS"): a command prefixed with `z` ends in NUL and so does
its reply. INSTREAM is followed by chunks, each a 4-byte big-endian length and that many bytes,
and a zero length ends the stream; clamd then answers one of

    stream: OK
    stream: Eicar-Signature FOUND
    INSTREAM size limit exceeded. ERROR      (more than StreamMaxLength bytes were sent;
                                              clamd answers at once and closes)
    <anything else> ERROR

and closes the connection. PING answers PONG. Everything else is garbage: a peer that is not
clamd, or a clamd in trouble.

Nothing here touches a socket or a clock; client.py drives these functions from Twisted.
"""

from __future__ import annotations

import struct
from typing import Iterator

from mailappliance.scan.interfaces import (Message, ScanFailure, VirusReport, VirusResult,
                                          batches)

INSTREAM = b"zINSTREAM\0"
PING = b"zPING\0"
END_OF_STREAM = b"\0\0\0\0"
# clamd(8) IDSESSION: many commands on one connection, each reply prefixed "<n>: " where n
# counts the session's commands from 1. The client keeps idle session connections for the
# next scans (client.py), which saves a connect, clamd's accept and a close per message.
IDSESSION = b"zIDSESSION\0"

# Bytes of message per INSTREAM chunk. clamd takes any chunk length up to StreamMaxLength
# (clamdscan sends 8 KiB pieces); 64 KiB keeps a 100 KiB message to two chunks and a 25 MiB
# one to 400. The chunk length costs nothing else: the pieces are slices, never copies.
FRAME_BYTES = 64 * 1024
# clamd's replies are "stream: " + a signature name + " FOUND": signature names in the official
# databases are well under 100 characters. A peer that sends 4 KiB without the NUL that ends a
# reply is not clamd; we stop reading and call it garbage instead of buffering more.
MAX_REPLY = 4096
# A signature name goes into the SMTP reply text and the log: at most this many characters,
# RFC 5321 section 4.5.3.1.5 allows 512 octets per reply line with room to spare.
MAX_SIGNATURE_NAME = 128
# Characters kept in a signature name (ClamAV names use letters, digits and ". _ - :");
# anything else (CR, LF, controls) becomes "?", so a name can never forge a reply line.
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:+/()")

_LENGTH = struct.Struct(">I")


def instream_request(message: Message, frame_bytes: int = FRAME_BYTES
                     ) -> Iterator[bytes | memoryview]:
    """The whole INSTREAM request as one flat run of buffers, for scatter-gather writes
    (socket.sendmsg): the command, then per chunk of at most `frame_bytes` its 4-byte length
    and the pieces of the message it covers, then the end marker. The pieces are the
    message's own chunks or memoryview slices of them: nothing of the message is copied."""
    yield INSTREAM
    for total, parts in batches(message, frame_bytes, views=True):
        yield _LENGTH.pack(total)
        yield from parts
    yield END_OF_STREAM


class ReplyReader:
    """Collects one NUL-terminated reply (a newline also ends one, for clamd's non-`z` form).

    `feed(data)` returns the reply line once it is complete, else None; `eof()` says what a
    closed connection without a complete reply means. After `overflow` is set the reader
    ignores further input.
    """

    def __init__(self, max_reply: int = MAX_REPLY) -> None:
        self.max_reply = max_reply
        self._buf = bytearray()
        self.overflow = False

    def feed(self, data: bytes) -> bytes | None:
        if self.overflow:
            return None
        start = len(self._buf)
        self._buf += data
        ends = [i for i in (self._buf.find(b"\0", start), self._buf.find(b"\n", start))
                if i >= 0]
        if ends:
            return bytes(self._buf[:min(ends)])
        if len(self._buf) > self.max_reply:
            self.overflow = True
            del self._buf[self.max_reply:]
        return None

    @property
    def partial(self) -> bytes:
        return bytes(self._buf)


def clean_name(name: str) -> str:
    """A signature name safe for one SMTP reply line and a log line."""
    return "".join(c if c in _NAME_CHARS else "?" for c in name[:MAX_SIGNATURE_NAME])


def _shown(raw: bytes) -> str:
    """Peer text for a log line: printable ASCII, cut short."""
    text = raw[:80].decode("ascii", "replace")
    return "".join(c if " " <= c <= "~" else "?" for c in text)


SIZE_LIMIT_DETAIL = ("clamd refused the message: INSTREAM size limit exceeded (clamd's"
                     " StreamMaxLength is below this message's size; set it to at least"
                     " [scan] max_bytes)")


def parse_instream_reply(line: bytes) -> VirusResult:
    """The meaning of clamd's answer to INSTREAM (without its NUL)."""
    text = line.decode("ascii", "replace").strip()
    if ": " in text and text.split(": ", 1)[0].isdigit():
        text = text.split(": ", 1)[1]               # IDSESSION's "<id>: " prefix
    if text == "stream: OK":
        return VirusReport(None)
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        name = text[len("stream: "):-len(" FOUND")].strip()
        if name:
            return VirusReport(clean_name(name))
    if text.endswith("ERROR"):
        if "size limit exceeded" in text.lower():
            return ScanFailure(SIZE_LIMIT_DETAIL, outage=False)
        return ScanFailure(f"clamd error: {_shown(line)}")
    return ScanFailure(f"unexpected answer from clamd: {_shown(line)!r}")


def parse_session_reply(line: bytes, number: int) -> VirusResult:
    """clamd's answer to the `number`th command of an IDSESSION: "<number>: <reply>". Any
    other number is garbage (a reply to a command we did not send, or a confused peer)."""
    prefix = b"%d: " % number
    if not line.startswith(prefix):
        return ScanFailure(f"unexpected answer from clamd (session reply {number} expected):"
                           f" {_shown(line)!r}")
    return parse_instream_reply(line[len(prefix):])


def parse_ping_reply(line: bytes) -> ScanFailure | None:
    if line.strip() == b"PONG":
        return None
    return ScanFailure(f"unexpected answer to PING: {_shown(line)!r}")


def closed_without_reply(reader: ReplyReader, sent_all: bool) -> ScanFailure:
    """The connection ended before a complete reply (clamd killed, restarted, overloaded)."""
    if reader.overflow:
        return ScanFailure(f"unexpected answer from clamd: {_shown(reader.partial)!r}...")
    if reader.partial:
        # An unterminated reply: read it anyway, clamd may have been cut off after writing it.
        result = parse_instream_reply(reader.partial)
        if isinstance(result, ScanFailure):
            return result
        return ScanFailure(f"clamd closed the connection mid-reply: {_shown(reader.partial)!r}")
    if sent_all:
        return ScanFailure("clamd closed the connection without an answer")
    return ScanFailure("clamd closed the connection while the message was being sent")
