"""The admin line protocol, sans-IO: bytes in, events out; replies in, bytes out.

A person drives it with ``socat - UNIX-CONNECT:var/admin.sock``: one command a line, one
reply block ending in a line ``.``. A reply whose first line starts with ``error:`` is a
refusal. Lines of a reply that begin with ``.`` are dot-stuffed (one more ``.`` in front),
as in SMTP and POP3, so only the terminator is a lone dot.

Secrets never share a line with a command: ``user add ADDR`` and ``user passwd ADDR`` take
the password from the next line, and on a TCP endpoint ``auth`` takes the token from the next
line. A command line can therefore be logged whole; a secret line never is, and it is never
echoed.

The grammar is the table COMMANDS: each entry names the words of the command, its
positional arguments (``NAME``, optional ``[NAME]``, repeated ``NAME...``), its options
(``--flag`` or ``--opt VALUE`` with a converter) and whether a secret line follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

# --- limits ----------------------------------------------------------------------------------

# The longest command is `alias add ADDR TARGET...` with users/store.py's MAX_ALIAS_TARGETS
# (100) targets of at most 256 octets each (RFC 5321 4.5.3.1.3 path limit): about 26 KB.
MAX_LINE = 32 * 1024
# Command words plus arguments on one line (alias add with 100 targets plus options).
MAX_WORDS = 110
# A reply never holds more lines than this (a queue of a million messages lists the first
# ones and says how many more there are), so one reply costs bounded memory.
MAX_REPLY_LINES = 10_000
# Replies of more than this many characters per line are cut (a line is one record).
MAX_REPLY_LINE = 4096
# `queue list` pages hold at most this many messages (--limit): a page is read from the queue
# directory in one pass and answered in one reply block (MAX_REPLY_LINES).
QUEUE_PAGE_MAX = 10_000
# Messages a `queue remove` line may name (a shell's command line, not a bulk interface).
QUEUE_REMOVE_MAX = 100
# After this many refused lines in a row the connection is closed (qmail-smtpd's errors
# limit in spirit): a client spraying garbage does not get served forever.
MAX_ERRORS = 20
TERMINATOR = b".\n"


# --- the grammar -----------------------------------------------------------------------------

def _int_bytes(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise ValueError("expected a number of bytes")
    return int(text)


def _queue_id(text: str) -> str:
    """A queue id as the log shows it (``N.hhhhhhhh``) or its number alone."""
    number, dot, check = text.partition(".")
    if not number.isdigit() or len(number) > 20 or (dot and (
            len(check) != 8 or any(c not in "0123456789abcdef" for c in check))):
        raise ValueError("a queue id is a number, or number.hex as the log shows it")
    return text


def _page_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= QUEUE_PAGE_MAX:
        raise ValueError(f"expected a number from 1 to {QUEUE_PAGE_MAX}")
    return int(text)


def _flush_target(text: str) -> str:
    if text.startswith("@"):
        domain = text[1:]
        if not domain or len(domain) > 255 or any(c.isspace() for c in domain):
            raise ValueError("expected @DOMAIN")
        return text
    return _queue_id(text)


@dataclass(frozen=True)
class CommandSpec:
    words: tuple[str, ...]
    args: tuple[str, ...] = ()
    options: Mapping[str, Callable[[str], object] | None] = field(default_factory=dict)
    secret: str | None = None          # what the next line holds ("password", "token")
    summary: str = ""
    convert: Mapping[str, Callable[[str], object]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return " ".join(self.words)

    def usage(self) -> str:
        parts = [self.name, *self.args]
        for opt, conv in self.options.items():
            parts.append(f"[{opt}]" if conv is None else
                         f"[{opt} {OPTION_METAVARS.get(opt, 'VALUE')}]")
        return " ".join(parts)

    def description(self) -> str:
        if self.secret:
            return f"{self.summary} ({self.secret} on the next line)"
        return self.summary


OPTION_METAVARS = {"--quota": "BYTES", "--postmaster": "ADDR", "--limit": "N", "--after": "ID"}

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(("help",), summary="this list"),
    CommandSpec(("stat",), (), {"--json": None},
                summary="services, up-time, connections, queue, last errors"),
    CommandSpec(("queue", "list"), (), {"--json": None, "--limit": _page_size,
                                        "--after": _queue_id},
                summary="queued messages: id, age, sender; per recipient state, attempts, "
                        "last error"),
    CommandSpec(("queue", "show"), ("ID",), summary="envelope, states and header of a message",
                convert={"ID": _queue_id}),
    CommandSpec(("queue", "flush"), ("[TARGET]",),
                summary="retry deferred recipients now: all, message ID, or @DOMAIN",
                convert={"TARGET": _flush_target}),
    CommandSpec(("queue", "remove"), ("ID...",), {"--bounce": None},
                summary="remove messages; --bounce returns them to the sender first",
                convert={"ID": _queue_id}),
    CommandSpec(("reload",), summary="re-read the configuration and rules files (like HUP)"),
    CommandSpec(("domain", "add"), ("NAME",), {"--postmaster": str},
                summary="add a virtual domain"),
    CommandSpec(("domain", "del"), ("NAME",), {"--force": None},
                summary="delete a domain and its mailboxes (--force: even with mail in them)"),
    CommandSpec(("domain", "list"), summary="list domains"),
    CommandSpec(("user", "add"), ("ADDR",), {"--quota": _int_bytes}, secret="password",
                summary="add a user with a Maildir"),
    CommandSpec(("user", "del"), ("ADDR",), summary="delete a user and its Maildir"),
    CommandSpec(("user", "passwd"), ("ADDR",), secret="password",
                summary="change a user's password"),
    CommandSpec(("user", "list"), ("[DOMAIN]",), summary="list users"),
    CommandSpec(("alias", "add"), ("ADDR", "TARGET..."), summary="map an address to targets"),
    CommandSpec(("alias", "del"), ("ADDR",), summary="delete an alias"),
    CommandSpec(("alias", "list"), summary="list aliases"),
    CommandSpec(("relay", "list"), summary="current POP-before-SMTP grants"),
    CommandSpec(("auth",), secret="token", summary="authenticate (TCP endpoints only)"),
    CommandSpec(("quit",), summary="close the connection"),
)

_BY_WORDS: dict[tuple[str, ...], CommandSpec] = {c.words: c for c in COMMANDS}
_GROUPS = frozenset(c.words[0] for c in COMMANDS if len(c.words) > 1)
# Commands allowed before `auth` on a connection that needs a token.
UNAUTHENTICATED = frozenset({"auth", "help", "quit"})


def help_lines() -> list[str]:
    width = max(len(c.usage()) for c in COMMANDS) + 2
    return [f"{c.usage():<{width}}{c.description()}" for c in COMMANDS]


# --- events ----------------------------------------------------------------------------------

class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Command:
    spec: CommandSpec
    args: Mapping[str, object]
    options: Mapping[str, object]
    secret: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> str:
        """The command for the log: never the secret line."""
        parts = [self.name]
        for v in self.args.values():
            parts.extend(v if isinstance(v, list) else [str(v)])
        for k, v in self.options.items():
            parts.append(k if v is True else f"{k} {v}")
        return " ".join(parts)


@dataclass(frozen=True)
class Invalid:
    """A line that is not a command; reply with `error: <text>`."""
    text: str
    fatal: bool = False         # close the connection after the reply


# --- the connection --------------------------------------------------------------------------

class AdminConnection:
    """Splits input into lines (LF or CRLF), parses them against COMMANDS.

    Bounded: at most MAX_LINE bytes of an unfinished line are kept; the rest of an overlong
    line is discarded up to its LF and reported once. Complete lines wait in a buffer the
    adapter bounds by not reading while a command is running.
    """

    def __init__(self, needs_token: bool = False) -> None:
        self._buf = bytearray()
        self._discarding = False        # inside an overlong line
        self._pending: list[bytes | Invalid] = []   # split lines, in order
        self.awaiting: Command | None = None        # command waiting for its secret line
        self.authenticated = not needs_token
        self.errors = 0
        self.closed = False
        self.eof = False                # the client will send nothing more

    # -- input --------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                rest = data[start:]
                if self._discarding:
                    return
                if len(self._buf) + len(rest) > MAX_LINE:
                    self._buf.clear()
                    self._discarding = True
                    self._pending.append(Invalid(f"line too long (limit {MAX_LINE} octets)"))
                else:
                    self._buf += rest
                return
            piece = data[start:nl]
            start = nl + 1
            if self._discarding:
                self._discarding = False
                continue
            if len(self._buf) + len(piece) > MAX_LINE:
                self._buf.clear()
                self._pending.append(Invalid(f"line too long (limit {MAX_LINE} octets)"))
                continue
            line = bytes(self._buf + piece)
            self._buf.clear()
            if line.endswith(b"\r"):
                line = line[:-1]
            self._pending.append(line)

    def end_of_input(self) -> None:
        """The client half-closed (``printf 'stat' | socat - UNIX-CONNECT:...``): an
        unterminated last line counts as a line; nothing more will come."""
        if self._buf and not self._discarding and not self.closed:
            self.receive_data(b"\n")
        self.eof = True

    def buffered(self) -> int:
        """Bytes held (partial line plus lines not yet turned into events)."""
        return len(self._buf) + sum(len(x) for x in self._pending if isinstance(x, bytes))

    def next_event(self) -> Command | Invalid | _NeedData:
        while self._pending and not self.closed:
            item = self._pending.pop(0)
            if isinstance(item, Invalid):
                if self.awaiting is not None:
                    # An overlong secret line: the command it belongs to is refused too.
                    self.awaiting = None
                return self._refuse(item.text)
            if self.awaiting is not None:
                cmd, self.awaiting = self.awaiting, None
                try:
                    secret = item.decode("utf-8")
                except UnicodeDecodeError:
                    return self._refuse(f"{cmd.spec.secret} is not UTF-8 text")
                self.errors = 0
                return Command(cmd.spec, cmd.args, cmd.options, secret)
            event = self._parse(item)
            if event is None:
                continue   # blank line: no reply, like a shell
            if isinstance(event, Invalid):
                return self._refuse(event.text)
            self.errors = 0
            if event.spec.secret:
                self.awaiting = event
                continue
            if event.name == "quit":
                self.closed = True
            return event
        return NEED_DATA

    def _refuse(self, text: str) -> Invalid:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.closed = True
            return Invalid(f"{text}; too many errors, closing", fatal=True)
        return Invalid(text)

    def _parse(self, line: bytes) -> Command | Invalid | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return Invalid("command line is not UTF-8 text")
        if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
            return Invalid("control characters in command line")
        words = text.split()
        if not words:
            return None
        if len(words) > MAX_WORDS:
            return Invalid(f"too many words (limit {MAX_WORDS})")
        head = words[0].lower()
        spec = None
        rest: list[str] = []
        if len(words) > 1 and (head, words[1].lower()) in _BY_WORDS:
            spec, rest = _BY_WORDS[(head, words[1].lower())], words[2:]
        elif (head,) in _BY_WORDS:
            spec, rest = _BY_WORDS[(head,)], words[1:]
        if spec is None:
            if head in _GROUPS:
                subs = sorted(c.words[1] for c in COMMANDS if c.words[0] == head)
                return Invalid(f"{head}: expected one of {', '.join(subs)}")
            return Invalid(f"unknown command {clip(words[0])!r}; try help")
        if not self.authenticated and spec.name not in UNAUTHENTICATED:
            return Invalid("authenticate first: auth, then the token on the next line")
        return parse_arguments(spec, rest)


def clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def parse_arguments(spec: CommandSpec, words: list[str]) -> Command | Invalid:
    positional: list[str] = []
    options: dict[str, object] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--") and len(w) > 2:
            if w not in spec.options:
                return Invalid(f"{spec.name}: unknown option {clip(w)!r}; usage: {spec.usage()}")
            if w in options:
                return Invalid(f"{spec.name}: option {w} given twice")
            conv = spec.options[w]
            if conv is None:
                options[w] = True
            else:
                if i + 1 >= len(words):
                    return Invalid(f"{spec.name}: option {w} needs a value")
                try:
                    options[w] = conv(words[i + 1])
                except ValueError as e:
                    return Invalid(f"{spec.name}: {w}: {e}")
                i += 1
        else:
            positional.append(w)
        i += 1
    args: dict[str, object] = {}
    names = list(spec.args)
    for n, name in enumerate(names):
        if name.endswith("..."):
            key = name[:-3]
            values = positional[n:]
            if not values:
                return Invalid(f"{spec.name}: missing {key}; usage: {spec.usage()}")
            conv = spec.convert.get(key)
            if conv is not None:
                try:
                    values = [conv(v) for v in values]
                except ValueError as e:
                    return Invalid(f"{spec.name}: {key}: {e}")
            args[key] = values
            positional = positional[:n]
            break
        if name.startswith("["):
            key = name[1:-1]
            if n < len(positional):
                value = positional[n]
                conv = spec.convert.get(key)
                if conv is not None:
                    try:
                        value = conv(value)
                    except ValueError as e:
                        return Invalid(f"{spec.name}: {key}: {e}")
                args[key] = value
            continue
        if n >= len(positional):
            return Invalid(f"{spec.name}: missing {name}; usage: {spec.usage()}")
        value = positional[n]
        conv = spec.convert.get(name)
        if conv is not None:
            try:
                value = conv(value)
            except ValueError as e:
                return Invalid(f"{spec.name}: {name}: {e}")
        args[name] = value
    else:
        if len(positional) > len(names):
            return Invalid(f"{spec.name}: too many arguments; usage: {spec.usage()}")
    return Command(spec, args, options)


# --- output ----------------------------------------------------------------------------------

def _reply_line(text: str) -> bytes:
    text = "".join(c if (ord(c) >= 32 and ord(c) != 127) or c == "\t" else "?" for c in text)
    if len(text) > MAX_REPLY_LINE:
        text = text[:MAX_REPLY_LINE] + "..."
    if text.startswith("."):
        text = "." + text
    return text.encode("utf-8", "backslashreplace") + b"\n"


def encode_reply(lines: Iterable[str]) -> bytes:
    """A reply block: every line made safe (no CR/LF inside, dot-stuffed), then ".".

    More than MAX_REPLY_LINES lines are cut with a last line saying how many were left out."""
    out = []
    n = 0
    extra = 0
    for line in lines:
        for part in str(line).split("\n"):
            if n < MAX_REPLY_LINES:
                out.append(_reply_line(part))
                n += 1
            else:
                extra += 1
    if extra:
        out.append(_reply_line(f"({extra} more lines not shown)"))
    out.append(TERMINATOR)
    return b"".join(out)


def encode_error(text: str) -> bytes:
    first = "error: " + " ".join(str(text).split("\n"))
    return encode_reply([first])


# --- client side (used by `mailappliance` and tests) -----------------------------------------

class ReplyReader:
    """Collects reply blocks from received bytes; `replies` holds (ok, lines) tuples."""

    def __init__(self, max_line: int = MAX_REPLY_LINE * 4 + 16) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self.replies: list[tuple[bool, list[str]]] = []
        self.max_line = max_line

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    raise ValueError("reply line too long")
                return
            raw = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line == ".":
                lines, self._lines = self._lines, []
                ok = not (lines and lines[0].startswith("error:"))
                self.replies.append((ok, lines))
                continue
            if line.startswith(".."):
                line = line[1:]
            self._lines.append(line)
