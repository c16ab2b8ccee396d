"""What the log says about where a message came from (issue 17: a message can be traced from
its client to each delivery): the client address, HELO, AUTH user and Message-ID, as one
``key=value`` text the queue keeps in the envelope (its "received from" field) and the queue
manager writes in its ``new msg N: ...`` line.

`MessageIdScanner` finds the Message-ID field in a message's header as it streams past, in the
canonical form the SMTP core hands out (lines end in LF). Pure: no I/O, bounded memory.
"""

from __future__ import annotations

# Header bytes looked at for a Message-ID; past this the scanner gives up (the field is near
# the top of every header a mail program writes; a header this long is not worth reading).
MAX_HEADER_SCAN = 256 * 1024
# A Message-ID value is kept up to this many bytes (RFC 5322 2.1.1's line limit, 998).
MAX_MESSAGE_ID = 998
_NAME = b"message-id:"


def _safe(text: str, limit: int = MAX_MESSAGE_ID) -> str:
    """One word for a log line: printable ASCII, no spaces (qmail-send's logsafe: '_')."""
    out = []
    for ch in text[:limit]:
        if ch == " ":
            out.append("_")
        elif " " < ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return "".join(out) or "-"


def trace_text(ip: str, helo: str | None, auth_user: str | None,
               message_id: str | None) -> str:
    """``rip=192.0.2.7 helo=client.example auth=alice@example.com message-id=<x@y>``; '-' for
    what is not known."""
    return (f"rip={_safe(ip or '')} helo={_safe(helo or '')} auth={_safe(auth_user or '')} "
            f"message-id={_safe(message_id or '')}")


class MessageIdScanner:
    """feed() the message bytes (LF lines); `message_id` is the first Message-ID field's
    value (unfolded, stripped) once the header has ended, or None."""

    __slots__ = ("done", "message_id", "_line", "_value", "_seen")

    def __init__(self) -> None:
        self.done = False
        self.message_id: str | None = None
        self._line = bytearray()          # the current line, at most MAX_MESSAGE_ID + 16 bytes
        self._value: bytearray | None = None   # the field's value while its lines pass
        self._seen = 0

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        before = self._seen
        self._seen += len(data)
        start, n = 0, len(data)
        while start < n and not self.done:
            nl = data.find(b"\n", start)
            end = n if nl < 0 else nl
            if before + end > MAX_HEADER_SCAN:
                self._value = None        # a field cut by the bound is not trusted
                self._finish()
                return
            room = MAX_MESSAGE_ID + 16 - len(self._line)
            if room > 0:
                self._line += data[start:min(end, start + room)]
            if nl < 0:
                break
            self._end_of_line(bytes(self._line))
            self._line.clear()
            start = nl + 1

    def _end_of_line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._finish()                # the blank line ends the header
            return
        if line[:1] in (b" ", b"\t"):
            if self._value is not None and len(self._value) < MAX_MESSAGE_ID:
                self._value += b" " + line.strip()
            return
        if self._value is not None:
            self._finish()                # the field ended; the first one counts
            return
        if line[:len(_NAME)].lower() == _NAME and self.message_id is None:
            self._value = bytearray(line[len(_NAME):].strip())

    def _finish(self) -> None:
        self.done = True
        if self._value is not None and self.message_id is None:
            text = bytes(self._value[:MAX_MESSAGE_ID]).decode("latin-1").strip()
            self.message_id = text or None
        self._value = None
        self._line = bytearray()
