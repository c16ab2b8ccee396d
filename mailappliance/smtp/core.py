"""The SMTP server as a sans-IO state machine (RFC 5321, qmail-smtpd's behaviour).

Shaped like h11's Connection::

    conn = ServerConnection(hostname="mx.test.com", databytes=..., max_recipients=...)
    out = conn.send(replies.greeting(...))          # the greeting is the first reply
    conn.receive_data(bytes_from_socket)            # b"" means the client closed its side
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED: break
        if isinstance(ev, DataChunk): writer.write(ev.data); continue
        out += conn.send(decide(ev))                # exactly one reply per command event

Every command line yields exactly one event that wants exactly one reply. Until that reply is
given with `send()`, `next_event()` returns PAUSED: the core never looks at the next pipelined
command before the previous one is answered, so replies leave in command order even when the
adapter decides asynchronously (RFC 2920 section 3.1). Most events carry the core's own answer in
`event.reply` (syntax errors, sequence errors, NOOP, ...); the adapter sends it unchanged or
replaces it with a policy decision. `RcptTo` and a clean `MessageEnd` carry no reply: the relay
decision and the queue commit are the adapter's job and nothing defaults to "250 ok".

DATA is streamed: `DataChunk` events carry the message in its canonical stored form (lines end
in LF, dot-stuffing removed), in pieces as they arrive, never the whole message. The end is
``CRLF . CRLF`` and nothing else; a bare LF or a bare CR ends the session with qmail's 451.

State is read from `send()`: the reply code given to an event decides the transition (250 to
MAIL opens the transaction, 354 to DATA enters data mode, 220 to STARTTLS drops buffered input,
any 421 closes), laid out as the `_AFTER_REPLY` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import formatdate
from typing import Callable

from mailappliance.address import AddressError, Mailbox, Path, split_path
from mailappliance.smtp import replies
from mailappliance.smtp.replies import Reply

# RFC 5321 section 4.5.3.1.4 allows 512 octets per command line, 4.5.3.1.6 1000 per text line;
# we take the larger (also what qmail and Postfix's line_length_limit tolerate) for commands.
MAX_COMMAND_LINE = 1000
# A client that sends this much without any line end is not talking SMTP: 421 and close. Bytes of
# an overlong line are discarded as they arrive, so memory stays at MAX_COMMAND_LINE meanwhile.
MAX_DISCARDED_LINE = 1 << 20
# RFC 5321 section 4.5.3.1.10 says 512 for reply lines; ours are shorter. SIZE values beyond
# 20 digits are nonsense (2**64 has 20 digits).
MAX_SIZE_DIGITS = 20
# qmail-smtpd's MAXHOPS: a message with more Received: and Delivered-To: header lines than this
# is looping between mail servers; it is refused with 554 after the final dot.
MAX_HOPS = 100
# Bytes of an unfinished header line kept between DATA pieces: enough to recognise the longest
# header name we count ("delivered-to:" plus the newline before it).
_HOP_PREFIX = 16
# Not SMTP verbs: an HTTP client (or a browser tricked into POSTing to port 25) gets 502 and is
# closed, as Postfix's smtpd_forbidden_commands (CONNECT GET POST) does.
HTTP_VERBS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE",
                        b"PATCH", b"TRACE"})
# The extensions this core implements (RFC 2920, RFC 6152, RFC 1870, RFC 2034).
BASE_EXTENSIONS = ("PIPELINING", "8BITMIME")


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")   # feed more bytes with receive_data()
PAUSED = _Sentinel("PAUSED")         # answer the last event with send() first


class ProtocolUsageError(RuntimeError):
    """The adapter used the core out of order (a bug in our code, never the client's)."""


# --- events -----------------------------------------------------------------------------------

class Event:
    __slots__ = ()
    wants_reply = True


@dataclass(slots=True)
class Hello(Event):
    name: str
    extended: bool                  # EHLO
    reply: Reply | None = None


@dataclass(slots=True)
class MailFrom(Event):
    path: Path
    size: int | None                # SIZE= parameter (RFC 1870)
    body: str | None                # BODY= parameter (RFC 6152)
    auth: str | None                # AUTH= parameter (RFC 4954 section 5)
    reply: Reply | None = replies.MAIL_OK

    @property
    def sender(self) -> Mailbox | None:
        return self.path.mailbox


@dataclass(slots=True)
class RcptTo(Event):
    path: Path
    reply: Reply | None = None      # no default: the relay policy must decide

    @property
    def recipient(self) -> Mailbox:
        return self.path.mailbox    # type: ignore[return-value]  # never None for RCPT


@dataclass(slots=True)
class DataStart(Event):
    reply: Reply | None = replies.START_DATA


@dataclass(slots=True)
class DataChunk(Event):
    data: bytes
    wants_reply = False


@dataclass(slots=True)
class MessageEnd(Event):
    sender: str                     # "" for the null reverse path
    recipients: tuple[str, ...]
    size: int                       # canonical bytes received (LF line ends, unstuffed)
    reply: Reply | None = None      # set when the message is refused (databytes, bare LF/CR)


@dataclass(slots=True)
class Reset(Event):
    reply: Reply | None = replies.RESET


@dataclass(slots=True)
class Quit(Event):
    reply: Reply | None = None


@dataclass(slots=True)
class StartTLS(Event):
    reply: Reply | None = replies.TLS_READY


@dataclass(slots=True)
class Auth(Event):
    mechanism: str                  # upper-case, one of conn.auth_mechanisms
    initial: str | None             # initial response (RFC 4954), "=" means empty
    reply: Reply | None = None


@dataclass(slots=True)
class AuthResponse(Event):
    line: str                       # the client's answer to our 334 challenge
    reply: Reply | None = None


@dataclass(slots=True)
class Handled(Event):
    """A line the core answered itself (NOOP, HELP, VRFY, errors); send `reply` as it is."""
    verb: str
    reply: Reply


@dataclass(slots=True)
class ConnectionClosed(Event):
    wants_reply = False


CLOSED_EVENT = ConnectionClosed()

# --- states -----------------------------------------------------------------------------------

GREETING = "greeting"      # nothing said yet; client bytes now are a protocol violation
COMMAND = "command"
DATA = "data"
AUTH = "auth"              # reading a SASL response line
CLOSED = "closed"


class ServerConnection:
    """One SMTP server session. See the module docstring for the calling convention."""

    __slots__ = (
        "hostname", "databytes", "max_recipients", "max_errors", "postmaster_domain",
        "starttls_offered", "auth_mechanisms", "auth_after_tls", "tls", "authenticated",
        "state", "helo", "extended", "errors", "_buf", "_eof", "_pending", "_close_after",
        "_discarding", "_sender", "_recipients", "_bol", "_size", "_overflow", "_end",
        "_hops", "_hdr",
    )

    def __init__(self, hostname: str, *, databytes: int, max_recipients: int,
                 max_errors: int = 20, postmaster_domain: str | None = None,
                 starttls_offered: bool = False, auth_mechanisms: tuple[str, ...] = ()) -> None:
        self.hostname = hostname
        self.databytes = databytes
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        self.postmaster_domain = postmaster_domain or hostname.lower()
        self.starttls_offered = starttls_offered
        self.auth_mechanisms = auth_mechanisms
        # AUTH exists on this port but only once TLS is on: before that AUTH gets 538 instead
        # of 502 (the adapter sets auth_mechanisms when the handshake starts).
        self.auth_after_tls = False
        self.tls = False
        self.authenticated = False
        self.state = GREETING
        self.helo: str | None = None
        self.extended = False
        self.errors = 0
        self._buf = b""
        self._eof = False
        self._pending: Event | None = None
        self._close_after = False
        self._discarding = 0           # > 0: bytes of an overlong command line thrown away
        self._sender: Mailbox | None = None
        self._recipients: list[Mailbox] | None = None   # None: no MAIL yet
        self._bol = True
        self._size = 0
        self._overflow = False
        self._end: MessageEnd | None = None
        self._hops = 0
        self._hdr: bytes | None = None    # unfinished header line while in the header

    # --- public API ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is CLOSED

    @property
    def buffered(self) -> int:
        """Unprocessed input bytes (the adapter pauses reading when this grows while it waits)."""
        return len(self._buf)

    @property
    def in_transaction(self) -> bool:
        return self._recipients is not None

    @property
    def sender(self) -> Mailbox | None:
        return self._sender

    @property
    def recipients(self) -> tuple[Mailbox, ...]:
        return tuple(self._recipients or ())

    def receive_data(self, data: bytes) -> None:
        if self.state is CLOSED:
            return
        if not data:
            self._eof = True
        elif self._buf:
            self._buf += data
        else:
            self._buf = data

    def next_event(self) -> Event | _Sentinel:
        if self._pending is not None:
            return PAUSED
        state = self.state
        if state is DATA:
            ev = self._data_event()
        elif state is COMMAND or state is AUTH:
            ev = self._command_event()
        elif state is CLOSED:
            return CLOSED_EVENT
        else:   # GREETING
            if self._buf:
                self._close_after = True
                ev = Handled("", replies.PREGREET)
            elif self._eof:
                self.state = CLOSED
                return CLOSED_EVENT
            else:
                return NEED_DATA
        if isinstance(ev, Event) and ev.wants_reply:
            self._pending = ev
        return ev

    def send(self, reply: Reply) -> bytes:
        """The reply to the pending event (or the greeting, first); returns the bytes to write."""
        ev = self._pending
        if ev is None:
            if self.state is not GREETING:
                raise ProtocolUsageError("send() without an event to answer")
            self.state = CLOSED if reply.code >= 400 else COMMAND
            return reply.render(False)
        self._pending = None
        data = reply.render(self.extended)
        after = _AFTER_REPLY.get(type(ev))
        if after is not None:
            after(self, ev, reply)
        if reply.code == 421 or self._close_after:
            self._close()
        elif reply.code >= 500:
            self.errors += 1
            if self.errors >= self.max_errors:
                self._close()
                data += replies.TOO_MANY_ERRORS.render(self.extended)
        return data

    def close_with(self, reply: Reply) -> bytes:
        """Adapter-initiated end of the session (idle timeout, shutdown): the final reply."""
        self._pending = None
        self._close()
        return reply.render(self.extended)

    # --- command mode -------------------------------------------------------------------------

    def _command_event(self) -> Event | _Sentinel:
        buf = self._buf
        if self._discarding:
            i = buf.find(b"\n")
            if i < 0:
                self._discarding += len(buf)
                self._buf = b""
                if self._discarding > MAX_DISCARDED_LINE:
                    self._close_after = True
                    return Handled("", replies.LINE_FLOOD)
                return self._starved()
            self._buf = buf[i + 1:]
            self._discarding = 0
            if self.state is AUTH:
                self.state = COMMAND
            return Handled("", replies.LINE_TOO_LONG)
        i = buf.find(b"\n", 0, MAX_COMMAND_LINE)
        if i < 0:
            if len(buf) >= MAX_COMMAND_LINE:
                # Overlong: throw the line away up to its end (which may not be here yet).
                j = buf.find(b"\n", MAX_COMMAND_LINE)
                if j >= 0:
                    self._buf = buf[j + 1:]
                    if self.state is AUTH:
                        self.state = COMMAND
                    return Handled("", replies.LINE_TOO_LONG)
                self._discarding = len(buf)
                self._buf = b""
                return self._command_event()
            return self._starved()
        line = buf[:i]
        self._buf = buf[i + 1:]
        return self._line_event(line)

    def _line_event(self, line: bytes) -> Event:
        in_auth = self.state is AUTH
        if in_auth:
            self.state = COMMAND          # any line ends the SASL step, good or bad
        if not line.endswith(b"\r"):
            return Handled("", replies.BARE_LF_IN_COMMAND)
        line = line[:-1]
        if b"\0" in line:
            return Handled("", replies.NUL_IN_COMMAND)
        if b"\r" in line:
            return Handled("", replies.BARE_CR_IN_COMMAND)
        if in_auth:
            text = line.decode("latin-1")
            if text == "*":   # RFC 4954 section 4: the client cancels the exchange
                return Handled("AUTH", replies.AUTH_CANCELLED)
            return AuthResponse(text)
        sp = line.find(b" ")
        if sp < 0:
            verb, arg = line.upper(), ""
        else:
            verb, arg = line[:sp].upper(), line[sp + 1:].decode("latin-1")
        handler = COMMANDS.get(verb)
        if handler is not None:
            return handler(self, arg)
        if verb in HTTP_VERBS or verb.endswith(b":"):
            self._close_after = True
            return Handled(verb.decode("latin-1"), replies.HTTP_REQUEST)
        return Handled(verb.decode("latin-1"), replies.UNIMPLEMENTED)

    def _starved(self) -> Event | _Sentinel:
        if self._eof:
            self._close()
            return CLOSED_EVENT
        return NEED_DATA

    def _close(self) -> None:
        self.state = CLOSED
        self._buf = b""
        self._close_after = False

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = None

    # --- data mode ----------------------------------------------------------------------------

    def _data_event(self) -> Event | _Sentinel:
        end = self._end
        if end is not None:
            self._end = None
            return end
        buf = self._buf
        if not buf:
            return self._starved()
        bol = self._bol
        if bol and buf[0] == 46:                          # "." at the start of a line
            if buf.startswith(b".\r\n"):
                self._buf = buf[3:]
                return self._message_end(None)
            if len(buf) < 3 and b".\r\n".startswith(buf):  # "." or ".\r": wait for more
                return self._starved()
        t = buf.find(b"\r\n.\r\n")
        if t >= 0:
            region = buf[:t + 2]
            self._buf = buf[t + 5:]
            final = True
        else:
            # Hold back what could begin the terminator or split a CRLF pair.
            if buf.endswith(b"\r\n.\r"):
                hold = 2
            elif buf.endswith(b"\r\n.") or buf.endswith(b"\r"):
                hold = 1
            else:
                hold = 0
            if hold:
                region, self._buf = buf[:-hold], buf[-hold:]
                if not region:
                    return self._starved()
            else:
                region, self._buf = buf, b""
            final = False
        # Smuggling defence: every LF and every CR in the message must belong to a CRLF pair.
        # Whole-buffer passes of C loops only (issue 19: on this project's 2-core VM, for
        # 100 KiB, bytes.replace(CRLF, LF) costs ~220 us, deleting every CR with translate
        # ~70 us, a two-byte count ~100 us, a one-byte count ~45 us): once every CR and every
        # LF is known to be in a pair, deleting the CRs is the CRLF -> LF conversion.
        crlf = region.count(b"\r\n")
        canon = region.translate(None, b"\r")
        if canon.count(b"\n") != crlf:
            return self._smuggling(replies.BARE_LF_IN_DATA)
        if len(region) - len(canon) != crlf:
            return self._smuggling(replies.BARE_CR_IN_DATA)
        self._bol = region.endswith(b"\n")
        region = canon
        if bol and region[:1] == b".":
            region = region[1:]
        # Dot-stuffing (RFC 5321 4.5.2). The one-byte search (memchr) spares the slower
        # two-byte one for the many pieces with no dot at all.
        if crlf and b"." in region and b"\n." in region:
            region = region.replace(b"\n.", b"\n")
        if self._hdr is not None and region:
            self._count_hops(region)
        chunk: Event | None = None
        if region and not self._overflow:
            self._size += len(region)
            if self._size > self.databytes:
                self._overflow = True      # keep reading to the final dot, then 552
            else:
                chunk = DataChunk(region)
        elif region:
            self._size += len(region)
        if final:
            end_ev = self._message_end(None)
            if chunk is None:
                return end_ev
            self._end = end_ev             # emitted by the next call
            return chunk
        if chunk is None:
            return self._data_event()
        return chunk

    def _count_hops(self, region: bytes) -> None:
        """Count Received:/Delivered-To: lines of the header (LF-canonical text)."""
        text = self._hdr + region                  # starts with the newline before a line
        end = text.find(b"\n\n")
        if end >= 0:
            complete, self._hdr = text[:end], None  # the blank line: the header is over
        else:
            last = text.rfind(b"\n")
            complete, self._hdr = text[:last], text[last:last + _HOP_PREFIX]
        if complete:
            low = complete.lower()
            self._hops += low.count(b"\nreceived:") + low.count(b"\ndelivered-to:")
            if self._hops > MAX_HOPS:
                self._hdr = None                   # decided; stop looking

    def _message_end(self, reply: Reply | None) -> MessageEnd:
        if reply is None and self._overflow:
            reply = replies.SIZE_EXCEEDED
        elif reply is None and self._hops > MAX_HOPS:
            reply = replies.TOO_MANY_HOPS
        sender = self._sender
        return MessageEnd(
            sender="" if sender is None else str(sender),
            recipients=tuple(str(r) for r in self._recipients or ()),
            size=self._size, reply=reply)

    def _smuggling(self, reply: Reply) -> MessageEnd:
        """qmail's straynewline(): a bare LF (or CR) in DATA is answered with 451 and the session
        ends at once, so no byte after it is read as data or as a command."""
        self._buf = b""
        self._end = None
        self._close_after = True
        return self._message_end(reply)

    # --- EHLO keywords ------------------------------------------------------------------------

    def ehlo_keywords(self) -> list[str]:
        words = [*BASE_EXTENSIONS, f"SIZE {self.databytes}", "ENHANCEDSTATUSCODES"]
        if self.starttls_offered and not self.tls:
            words.append("STARTTLS")
        if self.auth_mechanisms and not self.authenticated:
            words.append("AUTH " + " ".join(self.auth_mechanisms))
        return words


# --- command handlers: (conn, argument text) -> event -----------------------------------------

def _helo(conn: ServerConnection, arg: str, extended: bool = False) -> Event:
    name = arg.strip(" ")
    if not name:
        return Handled("EHLO" if extended else "HELO", replies.HELO_NEEDS_NAME)
    if extended:
        reply = replies.ehlo(conn.hostname, conn.ehlo_keywords())
    else:
        reply = replies.helo(conn.hostname)
    return Hello(name, extended, reply)


def _ehlo(conn: ServerConnection, arg: str) -> Event:
    return _helo(conn, arg, True)


def _split_colon(arg: str, keyword: str) -> str | None:
    """"FROM:<a@b> SIZE=1" -> "<a@b> SIZE=1" (keyword case-insensitive), None if absent."""
    n = len(keyword)
    if arg[:n].upper() != keyword:
        return None
    return arg[n:]


def _address_error_reply(err: AddressError) -> Reply:
    if err.reason == AddressError.TOO_LONG:
        return replies.ADDRESS_TOO_LONG
    return replies.SYNTAX_ERROR


def _mail(conn: ServerConnection, arg: str) -> Event:
    if conn._recipients is not None:
        return Handled("MAIL", replies.NESTED_MAIL)
    rest = _split_colon(arg, "FROM:")
    if rest is None:
        return Handled("MAIL", replies.SYNTAX_ERROR)
    try:
        path, params = split_path(rest, null_ok=True)
    except AddressError as err:
        return Handled("MAIL", _address_error_reply(err))
    size = body = auth = None
    for param in params.split():
        key, _, value = param.partition("=")
        key = key.upper()
        if key == "SIZE" and value.isdigit() and len(value) <= MAX_SIZE_DIGITS:
            size = int(value)
        elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
            body = value.upper()
        elif key == "AUTH" and conn.auth_mechanisms and value:
            auth = value
        else:
            return Handled("MAIL", replies.BAD_PARAMETER)
    if size is not None and size > conn.databytes:
        # RFC 1870 section 6.2: a SIZE beyond the fixed limit gets 552 at MAIL.
        return Handled("MAIL", replies.SIZE_EXCEEDED)
    return MailFrom(path, size, body, auth)


def _rcpt(conn: ServerConnection, arg: str) -> Event:
    if conn._recipients is None:
        return Handled("RCPT", replies.MAIL_FIRST)
    rest = _split_colon(arg, "TO:")
    if rest is None:
        return Handled("RCPT", replies.SYNTAX_ERROR)
    try:
        path, params = split_path(rest, null_ok=False, postmaster_domain=conn.postmaster_domain)
    except AddressError as err:
        return Handled("RCPT", _address_error_reply(err))
    if params:
        return Handled("RCPT", replies.BAD_PARAMETER)     # no DSN here
    if len(conn._recipients) >= conn.max_recipients:
        # RFC 5321 section 4.5.3.1.10: 452 for recipients over the limit; the client retries them.
        return Handled("RCPT", replies.TOO_MANY_RECIPIENTS)
    return RcptTo(path)


def _data(conn: ServerConnection, arg: str) -> Event:
    if arg.strip(" "):
        return Handled("DATA", replies.NO_ARGUMENTS)
    if conn._recipients is None:
        return Handled("DATA", replies.MAIL_FIRST)
    if not conn._recipients:
        return Handled("DATA", replies.RCPT_FIRST)
    return DataStart()


def _rset(conn: ServerConnection, arg: str) -> Event:
    if arg.strip(" "):
        return Handled("RSET", replies.NO_ARGUMENTS)
    return Reset()


def _noop(conn: ServerConnection, arg: str) -> Event:
    return Handled("NOOP", replies.OK)       # RFC 5321 4.1.1.9: any argument is ignored


def _quit(conn: ServerConnection, arg: str) -> Event:
    return Quit(replies.closing(conn.hostname))


def _help(conn: ServerConnection, arg: str) -> Event:
    return Handled("HELP", replies.HELP)


def _vrfy(conn: ServerConnection, arg: str) -> Event:
    return Handled("VRFY", replies.VRFY)     # never reveals whether a user exists


def _expn(conn: ServerConnection, arg: str) -> Event:
    return Handled("EXPN", replies.EXPN)     # never reveals alias contents


def _starttls(conn: ServerConnection, arg: str) -> Event:
    if not conn.starttls_offered:
        return Handled("STARTTLS", replies.UNIMPLEMENTED)
    if conn.tls:
        return Handled("STARTTLS", replies.TLS_ALREADY)
    if arg.strip(" "):
        return Handled("STARTTLS", replies.NO_ARGUMENTS)
    return StartTLS()


def _auth(conn: ServerConnection, arg: str) -> Event:
    if not conn.auth_mechanisms:
        if conn.auth_after_tls and not conn.tls:
            return Handled("AUTH", replies.AUTH_NEEDS_TLS)     # RFC 4954 section 6: 538
        return Handled("AUTH", replies.UNIMPLEMENTED)
    if conn.authenticated:
        return Handled("AUTH", replies.AUTH_ALREADY)
    if conn._recipients is not None:
        return Handled("AUTH", replies.AUTH_NOT_IN_TRANSACTION)
    parts = arg.split()
    if not parts or len(parts) > 2:
        return Handled("AUTH", replies.SYNTAX_ERROR)
    mechanism = parts[0].upper()
    if mechanism not in conn.auth_mechanisms:
        return Handled("AUTH", replies.AUTH_UNKNOWN_MECHANISM)
    return Auth(mechanism, parts[1] if len(parts) == 2 else None)


# The command table, as qmail-smtpd's smtpcommands[]: verb -> handler. Nothing else dispatches.
COMMANDS: dict[bytes, Callable[[ServerConnection, str], Event]] = {
    b"HELO": _helo,
    b"EHLO": _ehlo,
    b"MAIL": _mail,
    b"RCPT": _rcpt,
    b"DATA": _data,
    b"RSET": _rset,
    b"NOOP": _noop,
    b"QUIT": _quit,
    b"HELP": _help,
    b"VRFY": _vrfy,
    b"EXPN": _expn,
    b"STARTTLS": _starttls,
    b"AUTH": _auth,
}


# --- transitions: what a reply to an event does to the session --------------------------------

def _after_hello(conn: ServerConnection, ev: Hello, reply: Reply) -> None:
    if reply.code // 100 == 2:
        conn.helo = ev.name
        conn.extended = ev.extended
        conn._reset_transaction()          # RFC 5321 4.1.4: EHLO/HELO resets the transaction


def _after_mail(conn: ServerConnection, ev: MailFrom, reply: Reply) -> None:
    if reply.code // 100 == 2:
        conn._sender = ev.path.mailbox
        conn._recipients = []


def _after_rcpt(conn: ServerConnection, ev: RcptTo, reply: Reply) -> None:
    if reply.code // 100 == 2 and conn._recipients is not None:
        conn._recipients.append(ev.path.mailbox)   # type: ignore[arg-type]


def _after_data(conn: ServerConnection, ev: DataStart, reply: Reply) -> None:
    if reply.code == 354:
        conn.state = DATA
        conn._bol = True
        conn._size = 0
        conn._overflow = False
        conn._end = None
        conn._hops = 0
        conn._hdr = b"\n"                  # as if a line had just ended


def _after_message(conn: ServerConnection, ev: MessageEnd, reply: Reply) -> None:
    conn.state = COMMAND
    conn._reset_transaction()              # RFC 5321 4.1.1.4: the transaction ends either way


def _after_reset(conn: ServerConnection, ev: Reset, reply: Reply) -> None:
    conn._reset_transaction()


def _after_quit(conn: ServerConnection, ev: Quit, reply: Reply) -> None:
    conn._close_after = True


def _after_starttls(conn: ServerConnection, ev: StartTLS, reply: Reply) -> None:
    if reply.code == 220:
        # RFC 3207 section 4.2: forget everything said before TLS, including pipelined input
        # (the command-injection class of CVE-2011-0411).
        conn._buf = b""
        conn.tls = True
        conn.helo = None
        conn.extended = False
        conn._reset_transaction()


def _after_auth(conn: ServerConnection, ev: Event, reply: Reply) -> None:
    if reply.code == 334:
        conn.state = AUTH
    elif reply.code == 235:
        conn.authenticated = True


_AFTER_REPLY: dict[type, Callable] = {
    Hello: _after_hello,
    MailFrom: _after_mail,
    RcptTo: _after_rcpt,
    DataStart: _after_data,
    MessageEnd: _after_message,
    Reset: _after_reset,
    Quit: _after_quit,
    StartTLS: _after_starttls,
    Auth: _after_auth,
    AuthResponse: _after_auth,
}


# --- the Received: header ---------------------------------------------------------------------

# qmail's safehost(): characters a HELO name may keep in our Received: line; others become "?".
_SAFE_HELO = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_[]:")
_SAFE_TABLE = bytes(c if c in _SAFE_HELO else ord("?") for c in range(256))
# A HELO name is echoed at most this long into the header (RFC 5322 section 2.1.1 line limits).
MAX_HELO_IN_HEADER = 200


def received_header(*, helo: str | None, client_ip: str, hostname: str, when: float,
                    protocol: str = "ESMTP") -> bytes:
    """qmail-smtpd's Received: line (LF line ends, the stored form)::

        Received: from unknown (HELO client.example) (192.0.2.1)
          by mx.test.com with ESMTP; 28 Nov 2024 10:15:00 -0000
    """
    safe_helo = (helo or "").encode("latin-1", "replace")[:MAX_HELO_IN_HEADER] \
        .translate(_SAFE_TABLE).decode("ascii")
    helo_part = f" (HELO {safe_helo})" if safe_helo else ""
    ip = client_ip.encode("latin-1", "replace").translate(_SAFE_TABLE).decode("ascii")
    date = formatdate(when, localtime=False)
    return (f"Received: from unknown{helo_part} ({ip})\n"
            f"  by {hostname} with {protocol}; {date}\n").encode("ascii", "replace")
