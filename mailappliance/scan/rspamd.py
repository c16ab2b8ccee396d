"""rspamd's HTTP check protocol (/checkv2), sans-IO: the request bytes and the reply's meaning.

rspamd's normal worker (Debian's `rspamd` package listens on localhost:11333) takes the message
as the body of `POST /checkv2` and the envelope as request headers (IP, Helo, From, Rcpt, User,
MTA-Name; rspamd's "Protocol" documentation), and answers JSON:

    {"is_skipped": false, "score": 20.0, "required_score": 15.0, "action": "reject",
     "symbols": {"SYMBOL": {"name": "SYMBOL", "score": 20.0, ...}, ...}, ...}

We use `score` and the symbol names and apply our own thresholds (verdict.py), so the same
settings mean the same thing whichever scorer sits behind ISpamScorer; rspamd's `action` is
kept for the log only. One request per connection (`Connection: close`), so a response ends at
its Content-Length or at the close.

Nothing here touches a socket or a clock; client.py drives these functions from Twisted.
"""

from __future__ import annotations

import json
import math

from mailappliance.scan.interfaces import ScanEnvelope, ScanFailure, SpamReport, SpamResult

PING_REQUEST = b"GET /ping HTTP/1.1\r\nHost: rspamd\r\nConnection: close\r\n\r\n"

# rspamd's reply for one message is a JSON object of its symbols and their options: a few KiB,
# tens of KiB for a message that hits many URL rules. A peer sending more than 1 MiB is not
# answering our question; we stop reading and call it garbage.
MAX_RESPONSE = 1 << 20
# Header section of the reply: rspamd sends five short lines.
MAX_RESPONSE_HEAD = 16 * 1024
# An envelope value in a request header (HELO text, addresses): RFC 5321's 512-octet command
# line bounds the HELO, 256 octets a path; anything longer is cut rather than sent.
MAX_HEADER_VALUE = 512
# Recipients named to rspamd (its per-recipient rules want them; [smtp] max_recipients
# defaults to 100, the RFC 5321 section 4.5.3.1.8 minimum).
MAX_RCPT_HEADERS = 100
# Symbols kept from a reply for our header and log line.
MAX_SYMBOLS = 50


def _value(text: str) -> str:
    """A request header value: printable ASCII only (no CR/LF can split the request)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_HEADER_VALUE])


def check_request(length: int, envelope: ScanEnvelope) -> bytes:
    """The request head for POST /checkv2 with a body of `length` bytes."""
    lines = ["POST /checkv2 HTTP/1.1", "Host: rspamd", f"Content-Length: {length}",
             "Connection: close"]
    if envelope.client_ip:
        lines.append(f"IP: {_value(envelope.client_ip)}")
    if envelope.helo:
        lines.append(f"Helo: {_value(envelope.helo)}")
    lines.append(f"From: <{_value(envelope.sender)}>")
    for rcpt in envelope.recipients[:MAX_RCPT_HEADERS]:
        lines.append(f"Rcpt: <{_value(rcpt)}>")
    if envelope.user:
        lines.append(f"User: {_value(envelope.user)}")
    if envelope.hostname:
        lines.append(f"MTA-Name: {_value(envelope.hostname)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class ResponseReader:
    """Collects one HTTP/1.x response. `feed(data)` returns (status, body) once complete
    (Content-Length reached), else None; `eof()` returns it for a response that ends at the
    close, or a ScanFailure."""

    def __init__(self, max_response: int = MAX_RESPONSE) -> None:
        self.max_response = max_response
        self._buf = bytearray()
        self._head: tuple[int, dict[str, str]] | None = None
        self._body_at = 0
        self.error: ScanFailure | None = None

    def feed(self, data: bytes) -> tuple[int, bytes] | ScanFailure | None:
        if self.error is not None:
            return self.error
        self._buf += data
        if len(self._buf) > self.max_response + MAX_RESPONSE_HEAD:
            self.error = ScanFailure(f"reply longer than {self.max_response} bytes")
            return self.error
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_RESPONSE_HEAD:
                    self.error = ScanFailure("reply header section too long")
                    return self.error
                return None
            head = self._parse_head(bytes(self._buf[:end]))
            if isinstance(head, ScanFailure):
                self.error = head
                return head
            self._head, self._body_at = head, end + 4
        status, headers = self._head
        if "transfer-encoding" in headers:
            self.error = ScanFailure("chunked reply not supported (rspamd sends Content-Length)")
            return self.error
        length = headers.get("content-length")
        if length is not None:
            body = self._buf[self._body_at:]
            if len(body) >= length:
                return status, bytes(body[:length])
        return None

    def eof(self) -> tuple[int, bytes] | ScanFailure:
        if self.error is not None:
            return self.error
        if self._head is None:
            if self._buf:
                return ScanFailure(f"incomplete reply: {_shown(bytes(self._buf))!r}")
            return ScanFailure("connection closed without an answer")
        status, headers = self._head
        body = bytes(self._buf[self._body_at:])
        length = headers.get("content-length")
        if length is not None and len(body) < length:
            return ScanFailure(f"connection closed after {len(body)} of {length} reply bytes")
        return status, body

    @staticmethod
    def _parse_head(head: bytes) -> tuple[int, dict] | ScanFailure:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return ScanFailure(f"not an HTTP reply: {_shown(lines[0])!r}")
        headers: dict = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                return ScanFailure(f"bad reply header line: {_shown(line)!r}")
            key = name.strip().lower().decode("ascii", "replace")
            val = value.strip().decode("latin-1")
            if key == "content-length":
                if not val.isdigit():
                    return ScanFailure(f"bad Content-Length: {_shown(value)!r}")
                headers[key] = int(val)
            else:
                headers[key] = val
        return int(parts[1]), headers


def _shown(raw: bytes) -> str:
    text = raw[:80].decode("ascii", "replace")
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _symbol(name: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-.") else "?" for c in name[:64])


def parse_check_reply(status: int, body: bytes) -> SpamResult:
    """The meaning of rspamd's answer to /checkv2."""
    if status != 200:
        return ScanFailure(f"rspamd answered HTTP {status}: {_shown(body)!r}")
    try:
        reply = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ScanFailure(f"rspamd answered something that is not JSON: {_shown(body)!r}")
    if not isinstance(reply, dict):
        return ScanFailure("rspamd answered JSON that is not an object")
    score = reply.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        if "error" in reply:
            return ScanFailure(f"rspamd error: {_shown(str(reply['error']).encode())}")
        return ScanFailure("rspamd answered without a numeric score")
    symbols = reply.get("symbols")
    names: tuple[str, ...] = ()
    if isinstance(symbols, dict):
        names = tuple(sorted(_symbol(str(k)) for k in symbols)[:MAX_SYMBOLS])
    action = reply.get("action")
    return SpamReport(float(score), names, _shown(action.encode()) if isinstance(action, str)
                      else None)


def parse_ping_reply(status: int, body: bytes) -> ScanFailure | None:
    if status == 200 and body.strip() == b"pong":
        return None
    return ScanFailure(f"unexpected answer to /ping: HTTP {status} {_shown(body)!r}")
