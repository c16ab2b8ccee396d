"""The inject socket's wire format, sans-IO: both the server (pickup/service.py) and the client
(mailappliance/sendmail.py) use it.

One request per connection, the server speaking first::

    S: MAILAPPLIANCE-INJECT 1 databytes=10485760 LF          (or a refusal "75 text" LF, then close)
    C: {"sender": ..., "recipients": [...], "extract": false, "fullname": null,
        "head": H, "size": N} LF                              (one JSON line)
    C: N octets: the message as the sendmail command read it; its first H octets are the header
       block (the server adds Received:, From:, Date:, Message-ID: and removes Bcc: there)
    S: CODE text LF, then close

CODE is the sendmail command's exit status (sysexits.h): 0 queued (text: "queued as QID"),
64 usage (bad address, no recipient), 65 data (over databytes, header too large), 75 try
again (queue write failed, server busy or stopping). `sender` is -f as given (null: the
caller's login name, looked up by the server from the peer's uid); bare names get the
server's default domain.

The server trusts nothing in the request: its size and lengths are checked before anything is
read into memory, the message's line ends are normalised again (no bare CR ever reaches the
queue), and the uid comes from the socket, never from the request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MAGIC = b"MAILAPPLIANCE-INJECT 1"
# The request line: a few options and the recipients. 1,000 recipients of 256 octets (RFC 5321
# 4.5.3.1.3's path limit) fit; a longer line is not a sendmail call.
MAX_REQUEST_LINE = 256 * 1024
# The header block is held in memory while the server adds its headers (the sendmail command's
# own limit, Postfix's header_size_limit is 100 KiB).
MAX_HEAD = 1 << 20
# A greeting or reply line is short; a longer one is not our server.
MAX_REPLY_LINE = 4096

EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL = 0, 64, 65, 75
CODES = frozenset({EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL})


class ProtocolError(ValueError):
    """A malformed line; str() is the text of the refusal."""


@dataclass(frozen=True)
class Request:
    sender: str | None
    recipients: tuple[str, ...]
    extract: bool
    fullname: str | None
    head: int
    size: int


@dataclass(frozen=True)
class Refusal:
    code: int
    text: str


@dataclass(frozen=True)
class Head:
    data: bytes                 # the header block, line ends normalised


@dataclass(frozen=True)
class Body:
    data: bytes                 # a piece of the rest, line ends normalised


class _End:
    def __repr__(self) -> str:
        return "END"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


END = _End()
NEED_DATA = _NeedData()


def unix_path(description: str) -> str:
    """The path of a `unix:PATH[:k=v...]` endpoint string (Twisted's escapes removed)."""
    body = description.split(":", 1)[1]
    return re.split(r"(?<!\\):", body)[0].replace("\\:", ":").replace("\\\\", "\\")


# --- lines ------------------------------------------------------------------------------------

def greeting(databytes: int) -> bytes:
    return MAGIC + b" databytes=%d\n" % databytes


def parse_greeting(line: bytes) -> int | Refusal:
    """The client's view of the first line: the server's databytes, or its refusal."""
    line = line.rstrip(b"\r\n")
    if line.startswith(MAGIC + b" databytes="):
        value = line[len(MAGIC) + len(b" databytes="):]
        if value.isdigit():
            return int(value)
    try:
        return parse_reply(line)
    except ProtocolError:
        raise ProtocolError("not a mailappliance inject socket") from None


def encode_reply(code: int, text: str) -> bytes:
    text = " ".join(text.split())[:MAX_REPLY_LINE - 8]
    return f"{code} {text}\n".encode("utf-8", "replace")


def parse_reply(line: bytes) -> Refusal:
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    code, _, rest = text.partition(" ")
    if not code.isdigit() or int(code) not in CODES:
        raise ProtocolError(f"unexpected reply {text[:80]!r}")
    return Refusal(int(code), rest)


def encode_request(req: Request) -> bytes:
    line = json.dumps({"sender": req.sender, "recipients": list(req.recipients),
                       "extract": req.extract, "fullname": req.fullname,
                       "head": req.head, "size": req.size}, ensure_ascii=True)
    return line.encode("ascii") + b"\n"


def _opt_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string or null")
    return value


def parse_request(line: bytes) -> Request:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("the request is not a JSON line") from None
    if not isinstance(obj, dict):
        raise ProtocolError("the request is not a JSON object")
    recipients = obj.get("recipients", [])
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise ProtocolError("recipients must be a list of strings")
    extract = obj.get("extract", False)
    head, size = obj.get("head"), obj.get("size")
    if type(extract) is not bool:
        raise ProtocolError("extract must be true or false")
    if type(head) is not int or type(size) is not int or not 0 <= head <= size:
        raise ProtocolError("head and size must be numbers with 0 <= head <= size")
    return Request(_opt_str(obj, "sender"), tuple(recipients), extract,
                   _opt_str(obj, "fullname"), head, size)


# --- the server's side of one connection -------------------------------------------------------

class Normaliser:
    """CRLF and lone CR -> LF across chunk boundaries (DESIGN.md, smuggling: the queue never
    holds a bare CR), and a final LF when the message does not end with one."""

    def __init__(self) -> None:
        self._cr = False
        self._last = b"\n"
        self._any = False

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        out = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if out:
            self._last = out[-1:]
            self._any = True
        return out

    def finish(self) -> bytes:
        out = b"\n" if self._cr else b""
        if not out and self._any and self._last != b"\n":
            out = b"\n"
        return out


REQUEST, HEAD, BODY, DONE = "request", "head", "body", "done"


class PickupConnection:
    """Bytes in, events out: Request, Head, Body..., END, or one Refusal (then nothing more).

    Memory is bounded by MAX_REQUEST_LINE + MAX_HEAD + what one receive_data brings; the body
    passes through. A request larger than `databytes` is refused before any of it is read."""

    def __init__(self, databytes: int) -> None:
        self.databytes = databytes
        self.state = REQUEST
        self._buf = bytearray()
        self._events: list = []
        self._left = 0               # body octets still to come
        self._norm = Normaliser()
        self.request: Request | None = None

    def receive_data(self, data: bytes) -> None:
        if self.state == DONE or not data:
            return
        self._buf += data
        self._advance()

    def _refuse(self, code: int, text: str) -> None:
        self.state = DONE
        self._buf.clear()
        self._events.append(Refusal(code, text))

    def _advance(self) -> None:
        if self.state == REQUEST:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_REQUEST_LINE:
                    self._refuse(EX_USAGE, f"request line longer than {MAX_REQUEST_LINE} octets")
                return
            if nl > MAX_REQUEST_LINE:
                self._refuse(EX_USAGE, f"request line longer than {MAX_REQUEST_LINE} octets")
                return
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            try:
                req = parse_request(line)
            except ProtocolError as e:
                self._refuse(EX_USAGE, str(e))
                return
            if req.size > self.databytes:
                self._refuse(EX_DATAERR, f"message of {req.size} octets is larger than "
                             f"databytes ({self.databytes})")
                return
            if req.head > MAX_HEAD:
                self._refuse(EX_DATAERR, f"header block larger than {MAX_HEAD} octets")
                return
            self.request = req
            self._events.append(req)
            self.state = HEAD
            self._left = req.size
        if self.state == HEAD:
            head = self.request.head
            if len(self._buf) < head:
                return
            data = bytes(self._buf[:head])
            del self._buf[:head]
            self._left -= head
            self._events.append(Head(self._norm.feed(data)))
            self.state = BODY
        if self.state == BODY:
            if self._buf and self._left:
                take = bytes(self._buf[:self._left])
                del self._buf[:len(take)]
                self._left -= len(take)
                out = self._norm.feed(take)
                if out:
                    self._events.append(Body(out))
            self._buf.clear()            # octets beyond `size` are ignored
            if self._left == 0:
                tail = self._norm.finish()
                if tail:
                    self._events.append(Body(tail))
                self._events.append(END)
                self.state = DONE

    def next_event(self):
        if self._events:
            return self._events.pop(0)
        return NEED_DATA
