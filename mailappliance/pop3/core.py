"""The POP3 server state machine (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS), sans-IO.

qmail split POP3 into qmail-popup (greeting, USER/PASS), checkpassword/vchkpw (the password
check) and qmail-pop3d (the mailbox). This core is the popup and pop3d parts as one table-driven
state machine; the password check and the mailbox are the adapter's job, requested through
actions:

    session = POP3Session(hostname="mx.test.com", ...)
    session.start()                      # queues the greeting
    session.receive_data(bytes)          # whatever arrived
    action = session.next_action()       # Send / Authenticate / StartTLS / Retrieve / Update /
                                         # Close, or PAUSED (waiting for the adapter), or
                                         # NEED_DATA (no complete command buffered)

The adapter answers a request by calling the matching completion method (login_succeeded,
login_failed, mailbox_unavailable, tls_started, retrieve_opened/retrieve_failed/retrieve_done,
update_done), then keeps calling next_action. Commands pipelined behind a request wait in the
buffer (RFC 2449 PIPELINING) and are handled, in order, once the request is answered.

No sockets, no clock reads, no files: time and the mailbox listing come in as arguments.

APOP is not offered. It needs the server to keep a cleartext-equivalent of every password (the
MD5 input is the password itself), and the user store keeps bcrypt hashes only. So the greeting
carries no RFC 1939 `<timestamp>` (qmail-popup's `<pid.time@host>`): clients such as mpop, with
their default `auth on`, pick APOP whenever the greeting has one. APOP answers a clear -ERR
saying why, and the CAPA IMPLEMENTATION line says the same.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

# --- limits ------------------------------------------------------------------------------------

# RFC 2449 section 4: "the maximum length of a command is increased from 47 characters ... to
# 255 octets, including the terminating CRLF".
MAX_LINE = 255
# Dovecot's CLIENT_MAX_BAD_COMMANDS (pop3-client.c / login-common): after 20 unknown or
# malformed commands the client is talking something else, so hang up.
MAX_BAD_COMMANDS = 20
# Failed PASS attempts one connection may make before it is closed. Three is the classic
# login(1)/getty count; the per-IP penalty (penalty.py) slows every attempt anyway, this only
# makes a brute-forcer pay the TCP (and TLS) set-up again.
MAX_AUTH_FAILURES = 3
# Message numbers and TOP line counts: more digits than this cannot name a message (a mailbox
# holds far fewer than 10**9 messages) and would only make Python build huge integers.
MAX_NUMBER_DIGITS = 9
# Unprocessed input held while a request (password check, RETR stream) is outstanding; past
# this the adapter stops reading from the socket until the backlog is handled. 64 KiB is
# enough for hundreds of pipelined commands (RFC 2449 PIPELINING).
MAX_PENDING_INPUT = 65536

# --- reply texts: every wire string in one table -----------------------------------------------

REPLIES: dict[str, str] = {
    # No <timestamp>: it would announce APOP (RFC 1939 7), which is not offered.
    "greeting": "+OK {hostname} POP3 server ready",
    "ok": "+OK",
    "user": "+OK",                                                    # qmail-popup: never tells
    "login": "+OK maildrop has {count} messages ({size} octets)",     # RFC 1939 5 example
    "auth_failed": "-ERR authorization failed",                       # qmail-popup / vchkpw
    "too_many_failures": "-ERR authorization failed, too many attempts: closing",
    "user_first": "-ERR USER first",                                  # qmail-popup
    "auth_first": "-ERR authorization first",                         # qmail-popup
    "not_after_login": "-ERR already authenticated",
    "stls_after_login": "-ERR STLS is only allowed before login (RFC 2595 4)",
    "tls_required": ("-ERR [AUTH] plaintext login disallowed on an unencrypted connection:"
                     " use STLS first"),
    "apop": ("-ERR APOP not supported: passwords are stored only as bcrypt hashes;"
             " use USER and PASS over TLS"),
    "unimplemented": "-ERR unimplemented",                            # qmail-pop3d
    "bad_line": "-ERR command line too long",
    "empty": "-ERR empty command",
    "bad_bytes": "-ERR command contains invalid characters",
    "too_many_bad": "-ERR too many bad commands: closing",
    "missing_arg": "-ERR missing argument",
    "extra_args": "-ERR too many arguments",
    "bad_number": "-ERR invalid message number: {arg}",
    "bad_count": "-ERR invalid line count: {arg}",
    "no_such_message": "-ERR no such message",
    "deleted_already": "-ERR message {n} already deleted",
    "list_header": "+OK {count} messages ({size} octets)",
    "list_one": "+OK {n} {size}",
    "uidl_header": "+OK unique-id listing follows",
    "uidl_one": "+OK {n} {uid}",
    "stat": "+OK {count} {size}",
    "dele": "+OK message {n} deleted",
    "rset": "+OK maildrop has {count} messages ({size} octets)",
    "retr": "+OK {size} octets",
    "top": "+OK top of message follows",
    "message_gone": "-ERR [SYS/TEMP] message {n} has vanished from the mailbox",
    "capa": "+OK capability list follows",
    "stls": "+OK begin TLS negotiation",
    "stls_active": "-ERR TLS already active",
    "stls_unavailable": "-ERR STLS not available: no certificate configured",
    "in_use": "-ERR [IN-USE] mailbox in use by another POP3 session",
    "mailbox_error": "-ERR [SYS/TEMP] unable to open the mailbox",
    "auth_unavailable": "-ERR [SYS/TEMP] unable to check the password now, try again later",
    "quit": "+OK signing off",
    "update_failed": "-ERR [SYS/TEMP] some deleted messages were not removed",
    "timeout": "-ERR autologout: idle for too long",
    "shutting_down": "-ERR [SYS/TEMP] server shutting down",
    # Connection limits ([pop3] max_per_ip, max_connections; descriptors.py's share).
    "too_many_from_ip": "-ERR [SYS/TEMP] too many connections from your address",
    "too_many_connections": "-ERR [SYS/TEMP] too many connections, try again later",
    "out_of_descriptors": "-ERR [SYS/TEMP] server out of connection slots, try again later",
}

CAPA_IMPLEMENTATION = "IMPLEMENTATION mailappliance (no APOP: passwords are stored as bcrypt hashes)"

AUTHORIZATION = "AUTHORIZATION"
TRANSACTION = "TRANSACTION"
UPDATE = "UPDATE"
CLOSED = "CLOSED"

# The command table, readable as data like qmail-pop3d's pop3commands[]: name -> (states where
# it is valid, (fewest, most) arguments). PASS and APOP take the rest of the line (a password may
# contain spaces), marked by None.
COMMANDS: dict[bytes, tuple[frozenset[str], tuple[int, int] | None]] = {
    b"USER": (frozenset({AUTHORIZATION}), (1, 1)),
    b"PASS": (frozenset({AUTHORIZATION}), None),
    b"APOP": (frozenset({AUTHORIZATION}), None),
    b"STLS": (frozenset({AUTHORIZATION}), (0, 0)),
    b"CAPA": (frozenset({AUTHORIZATION, TRANSACTION}), (0, 0)),
    b"QUIT": (frozenset({AUTHORIZATION, TRANSACTION}), (0, 0)),
    b"NOOP": (frozenset({AUTHORIZATION, TRANSACTION}), (0, 0)),
    b"STAT": (frozenset({TRANSACTION}), (0, 0)),
    b"LIST": (frozenset({TRANSACTION}), (0, 1)),
    b"UIDL": (frozenset({TRANSACTION}), (0, 1)),
    b"RETR": (frozenset({TRANSACTION}), (1, 1)),
    b"TOP": (frozenset({TRANSACTION}), (2, 2)),
    b"DELE": (frozenset({TRANSACTION}), (1, 1)),
    b"RSET": (frozenset({TRANSACTION}), (0, 0)),
}


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Marker("NEED_DATA")   # no complete command in the buffer
PAUSED = _Marker("PAUSED")         # waiting for the adapter to complete a request, or closed
_TOO_LONG = _Marker("TOO_LONG")    # internal: a command line over MAX_LINE


class Message(Protocol):
    """What the core needs from a mailbox listing entry (mailbox.MessageInfo provides it)."""

    uid: str
    size: int


# --- actions ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check `password` for `login` (raw, as typed); answer login_succeeded/login_failed."""
    login: str
    password: str


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The +OK has been queued before this; start TLS, then call tls_started()."""


@dataclass(frozen=True, slots=True)
class Retrieve:
    """Open message `number` (1-based); retrieve_opened() then stream, or retrieve_failed().

    `body_lines` is None for RETR, the TOP line count otherwise."""
    number: int
    message: Any
    body_lines: int | None


@dataclass(frozen=True, slots=True)
class Update:
    """QUIT in TRANSACTION: remove `deleted`, move `kept` from new/ to cur/; then update_done()."""
    deleted: tuple[Any, ...]
    kept: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


def reply(key: str, **kw: Any) -> bytes:
    return (REPLIES[key].format(**kw) + "\r\n").encode("utf-8", "replace")


def escape_login(login: str, limit: int = 100) -> str:
    """A login name made safe for one log line: printable ASCII except quote and backslash pass,
    everything else becomes \\xNN / \\uNNNN, so a CR, LF or fake `rip=` cannot forge a line."""
    out = []
    for ch in login[:limit]:
        o = ord(ch)
        if 0x20 < o < 0x7F and ch not in '"\\<>':
            out.append(ch)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    if len(login) > limit:
        out.append("...")
    return "".join(out)


def parse_number(arg: bytes) -> int | None:
    """ASCII digits only (no sign, no spaces, no unicode digits), bounded length; else None."""
    if not arg or len(arg) > MAX_NUMBER_DIGITS or not arg.isdigit():
        return None
    return int(arg)


class POP3Session:
    """One POP3 connection's protocol state."""

    def __init__(self, *, hostname: str = "localhost", tls_available: bool = False,
                 tls_active: bool = False, require_tls: bool = False) -> None:
        self.hostname = hostname
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.require_tls = require_tls
        self.state = AUTHORIZATION
        self.user: str | None = None          # login given by USER, awaiting PASS
        self.login: str | None = None         # login of the authenticated session
        self._buffer = bytearray()
        self._discarding = False              # inside an over-long line: skip to its LF
        self._actions: deque[Any] = deque()
        self._waiting: str | None = None      # "auth", "tls", "retr", "update"
        self._bad_commands = 0
        self._auth_failures = 0
        self._messages: Sequence[Message] = ()
        self._deleted = bytearray()           # 1 = marked by DELE
        self._live_count = 0
        self._live_size = 0
        self._pending_retr: Retrieve | None = None
        # The handlers, keyed like COMMANDS (a closed table, never built from input).
        self._handlers = {
            b"USER": self._user, b"PASS": self._pass, b"APOP": self._apop,
            b"STLS": self._stls, b"CAPA": self._capa, b"QUIT": self._quit,
            b"NOOP": self._noop, b"STAT": self._stat, b"LIST": self._list,
            b"UIDL": self._uidl, b"RETR": self._retr, b"TOP": self._top,
            b"DELE": self._dele, b"RSET": self._rset,
        }

    # --- input and output ---------------------------------------------------------------------

    def start(self) -> None:
        self._send(reply("greeting", hostname=self.hostname))

    def receive_data(self, data: bytes) -> None:
        if self.state != CLOSED:
            self._buffer += data

    @property
    def pending_input(self) -> int:
        """Bytes received but not yet handled (the adapter pauses reading above a bound)."""
        return len(self._buffer)

    @property
    def waiting(self) -> str | None:
        return self._waiting

    @property
    def message_count(self) -> int:
        return len(self._messages)

    def next_action(self) -> Any:
        while True:
            if self._actions:
                return self._actions.popleft()
            if self._waiting is not None or self.state == CLOSED:
                return PAUSED
            line = self._next_line()
            if line is None:
                return NEED_DATA
            self._handle_line(line)

    def _send(self, data: bytes) -> None:
        self._actions.append(Send(data))

    def _close(self, reason: str) -> None:
        self.state = CLOSED
        self._buffer.clear()
        self._actions.append(Close(reason))

    def _next_line(self) -> Any:
        buf = self._buffer
        while True:
            nl = buf.find(b"\n")
            if self._discarding:
                if nl < 0:
                    buf.clear()
                    return None
                del buf[:nl + 1]
                self._discarding = False
                continue
            if nl < 0:
                if len(buf) >= MAX_LINE:
                    # Too long already: answer now, then drop the rest of the line as it comes.
                    buf.clear()
                    self._discarding = True
                    return _TOO_LONG
                return None
            if nl + 1 > MAX_LINE:
                del buf[:nl + 1]
                return _TOO_LONG
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            return line

    def _bad(self, key: str, **kw: Any) -> None:
        self._bad_commands += 1
        if self._bad_commands >= MAX_BAD_COMMANDS:
            self._send(reply("too_many_bad"))
            self._close("too many bad commands")
        else:
            self._send(reply(key, **kw))

    def _handle_line(self, line: Any) -> None:
        if line is _TOO_LONG:
            self._bad("bad_line")
            return
        if not line.strip():
            self._bad("empty")
            return
        if b"\0" in line:
            self._bad("bad_bytes")
            return
        name, _, rest = line.partition(b" ")
        name = name.upper()
        entry = COMMANDS.get(name)
        if entry is None:
            self._bad("unimplemented")
            return
        states, arity = entry
        if self.state not in states:
            if self.state == AUTHORIZATION:
                self._bad("auth_first")
            elif name in (b"USER", b"PASS", b"APOP"):
                self._bad("not_after_login")
            elif name == b"STLS":
                self._bad("stls_after_login")
            else:
                self._bad("unimplemented")
            return
        if arity is None:
            self._handlers[name](rest)
            return
        args = rest.split()
        low, high = arity
        if len(args) < low:
            self._bad("missing_arg")
            return
        if len(args) > high:
            self._bad("extra_args")
            return
        self._handlers[name](*args)

    # --- AUTHORIZATION ------------------------------------------------------------------------

    def _plaintext_allowed(self) -> bool:
        return self.tls_active or not self.require_tls

    def _user(self, name: bytes) -> None:
        if not self._plaintext_allowed():
            self._bad("tls_required")
            return
        self.user = name.decode("utf-8", "replace")
        self._send(reply("user"))

    def _pass(self, rest: bytes) -> None:
        if not self._plaintext_allowed():
            self._bad("tls_required")
            return
        if self.user is None:
            self._bad("user_first")
            return
        login, self.user = self.user, None
        self._waiting = "auth"
        self.login = login
        self._actions.append(Authenticate(login, rest.decode("utf-8", "replace")))

    def _apop(self, rest: bytes) -> None:
        self._bad("apop")

    def _stls(self) -> None:
        if self.tls_active:
            self._bad("stls_active")
            return
        if not self.tls_available:
            self._bad("stls_unavailable")
            return
        # RFC 2595 / CVE-2011-0411: anything pipelined after STLS arrived in cleartext and must
        # not be executed inside the TLS session.
        self._buffer.clear()
        self._discarding = False
        self.user = None
        self._send(reply("stls"))
        self._waiting = "tls"
        self._actions.append(StartTLS())

    def tls_started(self) -> None:
        if not self._expect("tls"):
            return
        self.tls_active = True
        self._buffer.clear()

    def login_succeeded(self, messages: Sequence[Message]) -> None:
        """The password was right and the mailbox is locked and listed."""
        if not self._expect("auth"):
            return
        self.state = TRANSACTION
        self._messages = messages
        self._deleted = bytearray(len(messages))
        self._live_count = len(messages)
        self._live_size = sum(m.size for m in messages)
        self._send(reply("login", count=self._live_count, size=self._live_size))

    def login_failed(self) -> None:
        """Unknown user or wrong password: one answer for both."""
        if not self._expect("auth"):
            return
        self.login = None
        self._auth_failures += 1
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self._send(reply("too_many_failures"))
            self._close("too many failed logins")
        else:
            self._send(reply("auth_failed"))

    def login_unavailable(self) -> None:
        """The password could not be checked (user directory unreachable): not counted as a
        failure, and the client may try again."""
        if not self._expect("auth"):
            return
        self.login = None
        self._send(reply("auth_unavailable"))

    def mailbox_unavailable(self, in_use: bool) -> None:
        """The password was right but the mailbox is locked by another session or unreadable."""
        if not self._expect("auth"):
            return
        self.login = None
        self._send(reply("in_use" if in_use else "mailbox_error"))

    def _expect(self, what: str) -> bool:
        """Check that `what` is the outstanding request and clear it; False once closed (a
        timeout may close the session while the adapter's request is still running)."""
        if self.state == CLOSED:
            return False
        if self._waiting != what:
            raise RuntimeError(f"POP3 session is waiting for {self._waiting!r}, not {what!r}")
        self._waiting = None
        return True

    def _capa(self) -> None:
        lines = [REPLIES["capa"], "TOP", "UIDL", "RESP-CODES", "PIPELINING", "EXPIRE NEVER"]
        if self.state == AUTHORIZATION:
            if self._plaintext_allowed():
                lines.append("USER")
            if self.tls_available and not self.tls_active:
                lines.append("STLS")
        lines.append(CAPA_IMPLEMENTATION)
        lines.append(".")
        self._send(("\r\n".join(lines) + "\r\n").encode("ascii"))

    def _noop(self) -> None:
        self._send(reply("ok"))

    def _quit(self) -> None:
        if self.state == AUTHORIZATION:
            self._send(reply("quit"))
            self._close("quit")
            return
        self.state = UPDATE
        deleted = tuple(m for m, d in zip(self._messages, self._deleted) if d)
        kept = tuple(m for m, d in zip(self._messages, self._deleted) if not d)
        self._waiting = "update"
        self._actions.append(Update(deleted, kept))

    def update_done(self, failures: int) -> None:
        if not self._expect("update"):
            return
        self._send(reply("quit" if failures == 0 else "update_failed"))
        self._close("quit")

    def timed_out(self) -> None:
        if self.state != CLOSED:
            self._actions.clear()
            self._waiting = None
            self._send(reply("timeout"))
            self._close("timeout")

    # --- TRANSACTION --------------------------------------------------------------------------

    def _message_number(self, arg: bytes) -> int | None:
        """1-based number of a live message, or None after queueing the error reply."""
        n = parse_number(arg)
        if n is None:
            self._bad("bad_number", arg=arg[:20].decode("ascii", "replace"))
            return None
        if n < 1 or n > len(self._messages):
            self._send(reply("no_such_message"))
            return None
        if self._deleted[n - 1]:
            self._send(reply("deleted_already", n=n))
            return None
        return n

    def _stat(self) -> None:
        self._send(reply("stat", count=self._live_count, size=self._live_size))

    def _list(self, arg: bytes | None = None) -> None:
        if arg is not None:
            n = self._message_number(arg)
            if n is not None:
                self._send(reply("list_one", n=n, size=self._messages[n - 1].size))
            return
        deleted = self._deleted
        body = b"".join(b"%d %d\r\n" % (i + 1, m.size)
                        for i, m in enumerate(self._messages) if not deleted[i])
        self._send(reply("list_header", count=self._live_count, size=self._live_size)
                   + body + b".\r\n")

    def _uidl(self, arg: bytes | None = None) -> None:
        if arg is not None:
            n = self._message_number(arg)
            if n is not None:
                self._send(reply("uidl_one", n=n, uid=self._messages[n - 1].uid))
            return
        deleted = self._deleted
        body = "".join(f"{i + 1} {m.uid}\r\n"
                       for i, m in enumerate(self._messages) if not deleted[i])
        self._send(reply("uidl_header") + body.encode("utf-8", "replace") + b".\r\n")

    def _retr(self, arg: bytes) -> None:
        n = self._message_number(arg)
        if n is not None:
            self._request_retrieve(Retrieve(n, self._messages[n - 1], None))

    def _top(self, arg: bytes, count: bytes) -> None:
        n = self._message_number(arg)
        if n is None:
            return
        lines = parse_number(count)
        if lines is None:
            self._bad("bad_count", arg=count[:20].decode("ascii", "replace"))
            return
        self._request_retrieve(Retrieve(n, self._messages[n - 1], lines))

    def _request_retrieve(self, request: Retrieve) -> None:
        self._waiting = "retr"
        self._pending_retr = request
        self._actions.append(request)

    def retrieve_opened(self) -> bytes:
        """The message file is open: returns the +OK line to send before the content."""
        if self._waiting != "retr" or self._pending_retr is None:
            raise RuntimeError("no RETR/TOP outstanding")
        request = self._pending_retr
        if request.body_lines is None:
            return reply("retr", size=request.message.size)
        return reply("top")

    def retrieve_failed(self) -> None:
        """The file vanished (removed behind our back): -ERR instead of content."""
        request = self._pending_retr
        if not self._expect("retr"):
            return
        self._pending_retr = None
        self._send(reply("message_gone", n=request.number if request else 0))

    def retrieve_done(self) -> None:
        """The content and its terminating `.` line have been written."""
        if not self._expect("retr"):
            return
        self._pending_retr = None

    def _dele(self, arg: bytes) -> None:
        n = self._message_number(arg)
        if n is None:
            return
        self._deleted[n - 1] = 1
        self._live_count -= 1
        self._live_size -= self._messages[n - 1].size
        self._send(reply("dele", n=n))

    def _rset(self) -> None:
        self._deleted = bytearray(len(self._messages))
        self._live_count = len(self._messages)
        self._live_size = sum(m.size for m in self._messages)
        self._send(reply("rset", count=self._live_count, size=self._live_size))


# --- message encoding: LF or CRLF file content -> dot-stuffed CRLF wire form -----------------

# A line starting with ".". The regex engine finds this two-byte pattern several times faster
# than bytes.replace/find do (measured: 4 us against 17 us for 10 KiB), and RETR spends most
# of its own CPU here.
_DOT_LINE = re.compile(rb"\n\.")

class MessageEncoder:
    """Turns a stored message (LF or CRLF line ends) into RFC 1939 multi-line form, chunk by
    chunk: every line ends in CRLF, a line starting with "." gets another ".", and finish()
    closes with CRLF "." CRLF. With `body_lines` (TOP) it passes the header, the blank line and
    that many body lines, then reports `done` so the adapter stops reading the file.

    State across chunks is two flags (a CR held back at a chunk's end, and whether the next byte
    starts a line), so memory stays one chunk whatever the message size."""

    def __init__(self, body_lines: int | None = None) -> None:
        self._pending_cr = False
        self._line_start = True
        self._limit = body_lines
        self._in_header = True
        self._line_len = 0           # bytes seen of the current line (TOP's blank-line test)
        self._line_first = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        if self._limit is not None:
            data = self._cut(data)
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
            if not data:
                return b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        data = _DOT_LINE.sub(b"\n..", data.replace(b"\n", b"\r\n"))
        if self._line_start and data[:1] == b".":
            data = b"." + data
        self._line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        tail = b""
        if self._pending_cr:
            tail = b"\r"
            self._pending_cr = False
            self._line_start = False
        if not self._line_start:
            tail += b"\r\n"
        self.done = True
        return tail + b".\r\n"

    def _cut(self, data: bytes) -> bytes:
        """TOP: the prefix of `data` that still belongs to the header + `limit` body lines."""
        pos = 0
        end = len(data)
        while pos < end:
            if not self._in_header and self._limit <= 0:
                self.done = True
                return data[:pos]
            nl = data.find(b"\n", pos)
            if nl < 0:
                if self._line_len == 0:
                    self._line_first = data[pos:pos + 1]
                self._line_len += end - pos
                return data
            total = self._line_len + (nl - pos)
            first = self._line_first if self._line_len else data[pos:pos + 1]
            blank = total == 0 or (total == 1 and first == b"\r")
            self._line_len = 0
            if self._in_header:
                if blank:
                    self._in_header = False
            else:
                self._limit -= 1
            pos = nl + 1
        if not self._in_header and self._limit <= 0:
            self.done = True
        return data


def encode_whole(data: bytes) -> bytes:
    """The fast path for a message read in one chunk: wire form including the final `.` line.
    Same result as MessageEncoder().feed(data) + finish(), without the per-chunk state."""
    if b"\r" in data:
        enc = MessageEncoder()
        return enc.feed(data) + enc.finish()
    data = _DOT_LINE.sub(b"\n..", data.replace(b"\n", b"\r\n"))
    if data[:1] == b".":
        data = b"." + data
    if data and data[-1:] != b"\n":
        return data + b"\r\n.\r\n"
    return data + b".\r\n"
