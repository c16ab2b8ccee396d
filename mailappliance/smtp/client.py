"""A sans-IO ESMTP client for one delivery attempt (qmail-remote's conversation).

Bytes from the server go into `ClientCore.receive_data`; what to do comes back as actions:
`Send(bytes)`, `StartTLS()`, `SendBody()` (stream the message through `DataEncoder` now) and
`Close()`.  No sockets, no clock: the core says what it waits for (`awaiting`, a key of
`REPLY_DEADLINES`) and the adapter (delivery/remote.py) keeps the clock; when a deadline
passes it calls `deadline_passed`, which defers whatever has no result yet.

The conversation: greeting, EHLO (HELO if EHLO is refused), STARTTLS when offered and the
adapter can do TLS (opportunistic: a refusal just continues in clear), EHLO again, then
MAIL FROM (SIZE=, BODY=8BITMIME, SMTPUTF8 when offered and needed), one RCPT per recipient
and DATA -- all in one write with PIPELINING (RFC 2920), one at a time without -- then the
message, then QUIT.  Every recipient gets its own result: 2xx success, 4xx deferral, 5xx
failure, in qmail-remote's words ("<ip> does not like recipient.\\nRemote host said: ...").

Outbound data is first CRLF-normalised (CR, LF and CRLF all become CRLF) and then
dot-stuffed, so no stored byte sequence can end DATA early or start a second transaction,
wherever it falls in the stream or across chunk boundaries (`DataEncoder`).

A hostile server costs bounded memory: a reply line is cut at `MAX_REPLY_LINE` bytes, a reply
may have at most `MAX_REPLY_LINES` lines, and a reply nobody asked for ends the session.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailappliance.envelope import Result, deferral, failure, success

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including CRLF.  Longer lines are
# cut (not refused): some servers exceed the limit in harmless ways.
MAX_REPLY_LINE = 512
# Lines in one reply.  An EHLO reply has ~10-20; 100 is generous and bounds a hostile one.
MAX_REPLY_LINES = 100
# Bytes of a server's reply quoted in a delivery report (it goes to logs and bounces).
MAX_REPORT_TEXT = 1000
# EHLO keywords remembered (a hostile server could list thousands).
MAX_EXTENSIONS = 50

# Seconds one reply may take, from the moment we wait for it to its last line, however slowly
# it arrives: bytes that do not complete a reply earn no time (issue 18: a server answering one
# byte a second held a delivery for as long as it liked, because qmail-remote's timeoutremote,
# like ours before, restarted with every read).  The numbers are RFC 5321 section 4.5.3.2's
# minimum timeouts per command, which Postfix ships as smtp_*_timeout; Postfix applies them to
# a whole reply with smtp_per_record_deadline = yes.  [queue] reply_timeout caps every one.
REPLY_DEADLINES = {
    "greeting": 300,         # 4.5.3.2.1 initial 220 message: 5 minutes
    "EHLO": 300,             # Postfix smtp_helo_timeout (after STARTTLS: with the handshake)
    "HELO": 300,
    "STARTTLS": 300,         # Postfix smtp_starttls_timeout
    "MAIL": 300,             # 4.5.3.2.2 MAIL: 5 minutes
    "RCPT": 300,             # 4.5.3.2.3 RCPT: 5 minutes
    "DATA": 120,             # 4.5.3.2.4 DATA initiation: 2 minutes
    # 4.5.3.2.5 data block: 3 minutes.  While the message moves, the adapter also grants time
    # for the bytes the server takes (deadline.MIN_DATA_RATE), so only a stalled or trickling
    # reader is cut off, not a large message on a slow link.
    "message": 180,
    # 4.5.3.2.6 DATA termination: 10 minutes.  The longest, because the server may be scanning
    # and a message it accepts after we gave up is delivered twice.
    "end of data": 600,
    "QUIT": 300,             # Postfix smtp_quit_timeout; every result is known by then
}


class ProtocolError(Exception):
    """The server broke the protocol (malformed, oversized or unsolicited reply)."""


@dataclass(frozen=True)
class ServerReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as qmail-remote quotes it: "250 ok" lines joined by newlines."""
        out = "\n".join(f"{self.code} {line}".rstrip() for line in self.lines)
        return out[:MAX_REPORT_TEXT]


class ReplyParser:
    """Bytes -> complete ServerReply objects, with bounded memory."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._overlong = False
        self._lines: list[str] = []
        self._code: int | None = None

    def feed(self, data: bytes) -> list[ServerReply]:
        out: list[ServerReply] = []
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            piece = data[start:] if nl < 0 else data[start:nl]
            room = MAX_REPLY_LINE - len(self._line)
            if len(piece) > room:
                piece = piece[:max(room, 0)]
                self._overlong = True
            self._line += piece
            if nl < 0:
                break
            start = nl + 1
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            self._overlong = False
            reply = self._take_line(line)
            if reply is not None:
                out.append(reply)
        return out

    def _take_line(self, line: bytes) -> ServerReply | None:
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
            raise ProtocolError("malformed reply line")
        code = int(line[:3])
        if self._code is not None and code != self._code:
            raise ProtocolError("reply code changed within a multi-line reply")
        self._code = code
        text = line[4:].decode("utf-8", "replace")
        text = "".join(c if c >= " " and c != "\x7f" else "?" for c in text)
        self._lines.append(text)
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError("too many lines in one reply")
        if line[3:4] == b"-":
            return None
        reply = ServerReply(code, tuple(self._lines))
        self._lines, self._code = [], None
        return reply


_LINE_END = re.compile(rb"\r\n|\r|\n")


class DataEncoder:
    """Stored message (any line ends) -> DATA payload: CRLF everywhere, dot-stuffed, and a
    final ".\\r\\n".  Chunks may split anything, including a CR from its LF."""

    def __init__(self) -> None:
        self._bol = True           # the next byte starts a line
        self._after_cr = False     # the previous chunk ended in CR (already sent as CRLF)
        self.bytes_out = 0

    def encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]      # the LF of a CRLF split across chunks
        self._after_cr = False
        if not chunk:
            return b""
        self._after_cr = chunk.endswith(b"\r")
        data = _LINE_END.sub(b"\r\n", chunk)
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._bol and data[:1] == b".":
            data = b"." + data
        self._bol = data.endswith(b"\r\n")
        self.bytes_out += len(data)
        return data

    def finish(self) -> bytes:
        tail = (b"" if self._bol else b"\r\n") + b".\r\n"
        self._bol = True
        self.bytes_out += len(tail)
        return tail


# --- actions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartTLS:
    pass


@dataclass(frozen=True)
class SendBody:
    pass


@dataclass(frozen=True)
class Close:
    pass


# --- texts (qmail-remote's, #codes from RFC 3463) ---------------------------------------------

T_ACCEPTED = "{host} accepted message.\nRemote host said: {said}"
T_GREETING = "Connected to {host} but greeting failed.\nRemote host said: {said}"
T_HELO = "Connected to {host} but my name was rejected.\nRemote host said: {said}"
T_SENDER = "Connected to {host} but sender was rejected.\nRemote host said: {said}"
T_RCPT = "{host} does not like recipient.\nRemote host said: {said}"
T_DATA = "{host} failed on DATA command.\nRemote host said: {said}"
T_AFTER = "{host} failed after I sent the message.\nRemote host said: {said}"
T_NO_RCPT = "{host} did not accept any recipient; message not sent. (#4.4.2)"
T_DIED = "Connected to {host} but connection died. (#4.4.2)"
T_PROTOCOL = "Connected to {host} but it sent a malformed or oversized reply. (#4.4.2)"
T_SIZE = "Connected to {host} but the message exceeds its size limit of {limit} bytes. (#5.3.4)"
T_UTF8 = "Connected to {host} but it does not support SMTPUTF8 for a non-ASCII address. (#5.6.7)"
T_SLOW = ("Connected to {host} but it sent its {what} too slowly: not complete within "
          "{seconds:g} s. (#4.4.2)")
T_SLOW_MESSAGE = ("Connected to {host} but it took in the message too slowly: {seconds:g} s "
                  "without enough progress. (#4.4.2)")
T_ATTEMPT = ("Connected to {host} but the delivery attempt took longer than {seconds:g} s; "
             "gave up. (#4.4.2)")
# What T_SLOW calls the reply it waited for, by `ClientCore.awaiting`.
_SLOW_WHAT = {"greeting": "greeting", "end of data": "reply to the message",
              "QUIT": "reply to QUIT"}

# States
(GREETING, EHLO, HELO, STARTTLS, TRANSACTION, BODY, DATA_ABANDON, QUIT, DONE) = range(9)


def _path(address: str) -> str:
    # qmail's "#@[]" (double-bounce sender) and "" are the null path on the wire.
    return "<>" if address in ("", "#@[]") else f"<{address}>"


@dataclass
class _Pending:
    kind: str            # "MAIL" | "RCPT" | "DATA"
    index: int = -1      # recipient index for RCPT
    line: bytes = b""


@dataclass
class ClientCore:
    helo: str
    sender: str
    recipients: list[str]
    size: int
    host: str                        # how reports name the server (its IP address)
    tls_available: bool = False      # the adapter can start TLS

    state: int = GREETING
    extensions: dict[str, str] = field(default_factory=dict)
    tls_active: bool = False
    results: list[Result | None] = field(default_factory=list)
    try_next_host: bool = False      # no transaction started: another MX may do better
    body_sent: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.recipients)
        self._parser = ReplyParser()
        self._expected: list[_Pending] = []
        self._unsent: list[_Pending] = []
        self._accepted: list[int] = []
        self._mail_reply: ServerReply | None = None
        self._outstanding = 1            # the greeting
        self.pipelining = False
        self.replies_received = 0        # complete replies so far (each restarts the clock)

    # -- input --------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list:
        actions: list = []
        if self.state == DONE:
            return actions
        try:
            replies = self._parser.feed(data)
        except ProtocolError:
            replies = None
        if self.state == BODY and not self.body_sent and (replies is None or replies):
            # Anything from the server while we are still sending the message: a command
            # now would become message text, so hang up instead.
            self._fill(deferral(T_PROTOCOL.format(host=self.host)))
            self.state = DONE
            return [Close()]
        if replies is None:
            return self._count(self._abort(T_PROTOCOL))
        # Replies in this chunk can only answer commands sent before it arrived.
        answerable = self._outstanding
        for reply in replies:
            if answerable <= 0:
                # A reply to nothing we sent: the server is confused or hostile, and it
                # would otherwise pass for the answer to our next command (RCPT, DATA).
                actions.extend(self._count(self._abort(T_PROTOCOL)))
                break
            answerable -= 1
            self._outstanding -= 1
            self.replies_received += 1
            actions.extend(self._count(self._on_reply(reply)))
            if self.state == DONE:
                break
        return actions

    def _count(self, actions: list) -> list:
        """Each command line we send (and the message itself) owes us one reply."""
        for a in actions:
            if isinstance(a, Send):
                self._outstanding += a.data.count(b"\r\n")
            elif isinstance(a, SendBody):
                self._outstanding += 1
        return actions

    def tls_started(self) -> list:
        self.tls_active = True
        self.extensions = {}
        self.state = EHLO
        return self._count([Send(b"EHLO " + self.helo.encode("ascii", "replace") + b"\r\n")])

    def connection_lost(self) -> None:
        """Whatever has no result yet is deferred (the attempt is repeated later)."""
        if self.state == DONE:
            return
        self._fill(deferral(T_DIED.format(host=self.host)))
        if not self.body_sent and self.state < TRANSACTION:
            self.try_next_host = True
        self.state = DONE

    def body_done(self) -> None:
        self.body_sent = True

    # -- time ---------------------------------------------------------------------------------
    @property
    def awaiting(self) -> str | None:
        """What the conversation waits for (a key of REPLY_DEADLINES), None when it is over.
        "message" means we are still sending it: the server owes nothing yet."""
        state = self.state
        if state == GREETING:
            return "greeting"
        if state in (EHLO, HELO, STARTTLS):
            return ("EHLO", "HELO", "STARTTLS")[state - EHLO]
        if state == TRANSACTION:
            return self._expected[0].kind if self._expected else None
        if state == BODY:
            return "end of data" if self.body_sent else "message"
        if state == DATA_ABANDON:
            return "end of data"
        if state == QUIT:
            return "QUIT"
        return None

    def deadline_passed(self, seconds: float, whole_attempt: bool = False) -> list:
        """The adapter's clock ran out while we waited for `awaiting` (after `seconds`), or the
        whole delivery attempt did.  Whatever has no result yet is deferred with a text that
        says which; before a transaction another MX may do better."""
        if self.state == DONE:
            return []
        stage = self.awaiting
        if whole_attempt:
            text = T_ATTEMPT.format(host=self.host, seconds=seconds)
        elif stage == "message":
            text = T_SLOW_MESSAGE.format(host=self.host, seconds=seconds)
        else:
            what = _SLOW_WHAT.get(stage or "", f"reply to {stage}")
            text = T_SLOW.format(host=self.host, what=what, seconds=seconds)
        self._fill(deferral(text))
        if self.state < TRANSACTION:
            self.try_next_host = True
        self.state = DONE
        return [Close()]

    # -- results ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state == DONE

    def _fill(self, result: Result) -> None:
        for i, r in enumerate(self.results):
            if r is None:
                self.results[i] = result

    def _abort(self, template: str, said: str = "", status: str = "deferral",
               next_host: bool | None = None, **kw) -> list:
        text = template.format(host=self.host, said=said, **kw)
        self._fill(deferral(text) if status == "deferral" else failure(text))
        if next_host is None:
            next_host = self.state < TRANSACTION
        self.try_next_host = next_host
        if self.state in (DONE, QUIT):
            self.state = DONE
            return [Close()]
        self.state = QUIT
        return [Send(b"QUIT\r\n")]

    # -- the conversation ---------------------------------------------------------------------
    def _on_reply(self, reply: ServerReply) -> list:
        code = reply.code
        if self.state == GREETING:
            if code != 220:
                return self._abort(T_GREETING, reply.text, next_host=True)
            self.state = EHLO
            return [Send(b"EHLO " + self.helo.encode("ascii", "replace") + b"\r\n")]
        if self.state == EHLO:
            if code != 250:
                self.state = HELO
                return [Send(b"HELO " + self.helo.encode("ascii", "replace") + b"\r\n")]
            self._parse_ehlo(reply)
            if "STARTTLS" in self.extensions and self.tls_available and not self.tls_active:
                self.state = STARTTLS
                return [Send(b"STARTTLS\r\n")]
            return self._begin_transaction()
        if self.state == HELO:
            if code != 250:
                return self._abort(T_HELO, reply.text, next_host=True)
            self.extensions = {}
            return self._begin_transaction()
        if self.state == STARTTLS:
            if code == 220:
                return [StartTLS()]
            return self._begin_transaction()      # opportunistic: go on in clear
        if self.state == TRANSACTION:
            return self._on_transaction_reply(reply)
        if self.state == BODY:
            return self._on_final(reply)
        if self.state == DATA_ABANDON:
            self.state = QUIT
            return [Send(b"QUIT\r\n")]
        if self.state == QUIT:
            self.state = DONE
            return [Close()]
        # DONE: anything more is ignored
        return []

    def _parse_ehlo(self, reply: ServerReply) -> None:
        ext: dict[str, str] = {}
        for line in reply.lines[1:MAX_EXTENSIONS + 1]:
            word, _, param = line.strip().partition(" ")
            if word:
                ext[word.upper()] = param.strip()
        self.extensions = ext
        self.pipelining = "PIPELINING" in ext

    def _begin_transaction(self) -> list:
        self.state = TRANSACTION
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and self.size > int(limit):
            return self._abort(T_SIZE, status="failure", next_host=False, limit=int(limit))
        needs_utf8 = not all(a.isascii() for a in [self.sender, *self.recipients])
        if needs_utf8 and "SMTPUTF8" not in self.extensions:
            return self._abort(T_UTF8, status="failure", next_host=False)
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={self.size}")
        if "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if needs_utf8:
            params.append("SMTPUTF8")
        mail = ("MAIL FROM:" + _path(self.sender) + "".join(" " + p for p in params) + "\r\n")
        cmds = [_Pending("MAIL", line=mail.encode("utf-8"))]
        for i, rcpt in enumerate(self.recipients):
            cmds.append(_Pending("RCPT", i, ("RCPT TO:" + _path(rcpt) + "\r\n").encode("utf-8")))
        cmds.append(_Pending("DATA", line=b"DATA\r\n"))
        if self.pipelining:
            self._expected, self._unsent = cmds, []
            return [Send(b"".join(c.line for c in cmds))]
        self._expected, self._unsent = cmds[:1], cmds[1:]
        return [Send(cmds[0].line)]

    def _next_unpipelined(self) -> list:
        if not self._unsent:
            return []
        nxt = self._unsent.pop(0)
        if nxt.kind == "DATA" and not self._accepted:
            # Nobody accepted: don't send DATA at all.
            self._unsent = []
            self._fill(deferral(T_NO_RCPT.format(host=self.host)))
            self.state = QUIT
            return [Send(b"QUIT\r\n")]
        self._expected.append(nxt)
        return [Send(nxt.line)]

    def _on_transaction_reply(self, reply: ServerReply) -> list:
        if not self._expected:
            return self._abort(T_PROTOCOL, next_host=False)
        cmd = self._expected.pop(0)
        code = reply.code
        if cmd.kind == "MAIL":
            self._mail_reply = reply
            if code // 100 != 2:
                text = T_SENDER.format(host=self.host, said=reply.text)
                self._fill(failure(text) if code >= 500 else deferral(text))
                if not self.pipelining:
                    self.state = QUIT
                    return [Send(b"QUIT\r\n")]
            return self._next_unpipelined()
        if cmd.kind == "RCPT":
            mail_ok = self._mail_reply is not None and self._mail_reply.code // 100 == 2
            if mail_ok:
                if code // 100 == 2:
                    self._accepted.append(cmd.index)
                else:
                    text = T_RCPT.format(host=self.host, said=reply.text)
                    self.results[cmd.index] = failure(text) if code >= 500 else deferral(text)
            return self._next_unpipelined()
        # DATA
        if code == 354:
            if self._accepted and self._mail_reply is not None \
                    and self._mail_reply.code // 100 == 2:
                self.state = BODY
                return [SendBody()]
            # A pipelined DATA the server accepted although nobody may receive: end it empty.
            self._fill(deferral(T_NO_RCPT.format(host=self.host)))
            self.state = DATA_ABANDON
            return [Send(b".\r\n")]
        if self._accepted:
            text = T_DATA.format(host=self.host, said=reply.text)
            for i in self._accepted:
                self.results[i] = failure(text) if code >= 500 else deferral(text)
        self._fill(deferral(T_NO_RCPT.format(host=self.host)))
        self.state = QUIT
        return [Send(b"QUIT\r\n")]

    def _on_final(self, reply: ServerReply) -> list:
        code = reply.code
        if code // 100 == 2:
            result = success(T_ACCEPTED.format(host=self.host, said=reply.text))
        elif code >= 500:
            result = failure(T_AFTER.format(host=self.host, said=reply.text))
        else:
            result = deferral(T_AFTER.format(host=self.host, said=reply.text))
        for i in self._accepted:
            self.results[i] = result
        self._fill(deferral(T_DIED.format(host=self.host)))   # not reached: all have results
        self.state = QUIT
        return [Send(b"QUIT\r\n")]
