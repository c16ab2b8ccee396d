"""`mailappliance-sendmail` / `mailappliance sendmail`: sendmail-compatible injection for local
programs (qmail-inject + qmail-queue's jobs), through the queue's one door.

    mailappliance-sendmail [--config FILE] [--data DIR] [-t] [-i|-oi] [-f SENDER] [-F NAME]
                           [RECIPIENT...] < message

- Recipients come from the command line; with -t also from the To:, Cc: and Bcc: headers
  (added to the command-line ones, as Postfix's sendmail does). Bcc: headers are removed.
- Without -i a line holding a single "." ends the message (sendmail's default); with -i only
  end of file does.
- The sender is -f (or -r); `-f ""` or `-f "<>"` is the null sender. Without it:
  $USER@default_domain (the login name, as qmail-inject's default; the hostname when there is
  no default domain). A name without "@" gets the default domain.
- Headers added when missing, as qmail-inject does: From: (with -F as the display name),
  Date:, Message-ID:. A Received: line names the invoking uid, as qmail-queue's does.
- Line ends are stored as LF; a CR that is not part of CRLF becomes LF, so the queue never holds
  a bare CR (DESIGN.md: smuggling).
- With `[dkim] sign` on, a message whose From: or sender domain has a key under DATA/dkim is
  DKIM-signed before it is queued (the server's signing core, docs/MAILAUTH.md).

The message goes through `QueueStore.inject`, the same write + fsync + rename + directory fsync
that SMTP's commit uses; exit status 0 means it is durable in the queue.

Exit status (sysexits.h, as sendmail): 0 queued, 64 usage (bad option, no recipient, bad
address), 65 data error (header too large, message over databytes), 75 temporary failure
(queue not writable, disk full: try again), 78 configuration error.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import socket
import sys
import time
from email.utils import formataddr, formatdate, getaddresses
from pathlib import Path
from typing import BinaryIO, Mapping, Sequence, TextIO

from mailappliance.address import AddressError, parse_address
from mailappliance.pickup import core as pickup

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_TEMPFAIL = 75
EX_CONFIG = 78

# The header block is read into memory to find recipients and missing headers; 1 MiB is far
# above any real header (Postfix's header_size_limit is 100 KiB).
MAX_HEADER_BYTES = 1 << 20
READ_CHUNK = 64 * 1024
# The inject socket: seconds to connect and get the greeting (a local socket answers at once
# unless the server is wedged), to get the reply after sending (the server's fsyncs; a
# loaded disk takes seconds, not minutes), and to keep asking a server that says it is busy.
CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 120.0
BUSY_WAIT = 60.0

USAGE = ("usage: mailappliance-sendmail [--config FILE] [--data DIR] [-t] [-i] [-f SENDER] "
         "[-F NAME] [RECIPIENT...]")

# sendmail options we accept and ignore: name -> takes an argument. -bm is "deliver mail"
# (the default mode); -o<x> options (-oi handled, -oem, -odb, ...) are all accepted.
_IGNORED = {"v": False, "n": False, "U": False, "G": False, "m": False,
            "N": True, "B": True, "R": True, "V": True, "h": True, "L": True, "O": True}

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


class UsageError(Exception):
    pass


class Options:
    def __init__(self) -> None:
        self.config: str | None = None
        self.data: str | None = None
        self.extract = False            # -t
        self.ignore_dots = False        # -i / -oi
        self.sender: str | None = None  # -f / -r
        self.fullname: str | None = None
        self.recipients: list[str] = []


def parse_args(argv: Sequence[str]) -> Options:
    opts = Options()
    args = list(argv)
    i = 0

    def value(flag: str, rest: str) -> str:
        nonlocal i
        if rest:
            return rest
        i += 1
        if i >= len(args):
            raise UsageError(f"option -{flag} needs an argument")
        return args[i]

    while i < len(args):
        arg = args[i]
        if arg == "--":
            opts.recipients += args[i + 1:]
            break
        if arg.startswith("--"):
            name, eq, val = arg[2:].partition("=")
            if name not in ("config", "data"):
                raise UsageError(f"unknown option {arg}")
            if not eq:
                i += 1
                if i >= len(args):
                    raise UsageError(f"option {arg} needs an argument")
                val = args[i]
            setattr(opts, name, val)
        elif arg.startswith("-") and len(arg) > 1:
            flag, rest = arg[1], arg[2:]
            if flag == "t" and not rest:
                opts.extract = True
            elif flag == "i" and not rest:
                opts.ignore_dots = True
            elif flag == "o":
                if rest == "i":
                    opts.ignore_dots = True
                elif not rest:
                    raise UsageError("option -o needs a letter")
            elif flag in ("f", "r"):
                opts.sender = value(flag, rest)
            elif flag == "F":
                opts.fullname = value(flag, rest)
            elif flag == "b":
                if rest != "m":
                    raise UsageError(f"mode -b{rest} is not supported (only -bm)")
            elif flag in _IGNORED:
                if _IGNORED[flag]:
                    value(flag, rest)
            else:
                raise UsageError(f"unknown option {arg}")
        else:
            opts.recipients.append(arg)
        i += 1
    return opts


def _qualify(text: str, default_domain: str) -> str:
    """A recipient or sender as given -> canonical address; bare names get the default domain."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if "@" not in text:
        text = f"{text}@{default_domain}"
    try:
        return str(parse_address(text))
    except AddressError as e:
        raise UsageError(f"bad address {text!r}: {e.detail}") from None


def _split_addresses(values: list[str], default_domain: str) -> list[str]:
    out = []
    for _name, addr in getaddresses(values):
        if addr:
            out.append(_qualify(addr, default_domain))
    return out


def _read_message(stream: BinaryIO, ignore_dots: bool, limit: int) -> bytes:
    """stdin -> message bytes with LF line ends; stops at a lone "." line unless -i."""
    data = bytearray()
    while True:
        chunk = stream.read(READ_CHUNK)
        if not chunk:
            break
        data += chunk
        if len(data) > limit + READ_CHUNK:
            raise OverflowError
    text = bytes(data).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not ignore_dots:
        if text.startswith(b".\n") or text == b".":
            text = b""
        else:
            end = text.find(b"\n.\n")
            if end >= 0:
                text = text[:end + 1]
            elif text.endswith(b"\n."):
                text = text[:-1]
    if text and not text.endswith(b"\n"):
        text += b"\n"
    if len(text) > limit:
        raise OverflowError
    return text


def _split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """-> (header fields, each with its continuation lines), body (after the blank line)."""
    fields: list[bytes] = []
    pos = 0
    n = len(message)
    while pos < n:
        end = message.find(b"\n", pos)
        end = n if end < 0 else end + 1
        line = message[pos:end]
        if line in (b"\n", b""):
            pos = end
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _HEADER_NAME.match(line):
            fields.append(line)
        else:
            break                      # not a header: the body starts here (no blank line)
        pos = end
        if pos > MAX_HEADER_BYTES:
            raise OverflowError
    return fields, message[pos:]


def _field_name(field: bytes) -> str:
    m = _HEADER_NAME.match(field)
    return m.group(1).decode("ascii").lower() if m else ""


def _field_value(field: bytes) -> str:
    return field.split(b":", 1)[1].decode("utf-8", "replace").replace("\n", " ").strip()


def build_message(opts: Options, raw: bytes, *, sender: str, hostname: str, default_domain: str,
                  uid: int, now: float, unique: str, user: str | None = None,
                  via: str | None = None) -> tuple[bytes, list[str]]:
    """The stored message and its recipients (a pure function; tested directly). `user` is
    the login name of `uid` and `via` the way in ("the inject socket"), both for Received:."""
    fields, body = _split_header(raw)
    recipients = _split_addresses(opts.recipients, default_domain)
    if opts.extract:
        values = [_field_value(f) for f in fields if _field_name(f) in ("to", "cc", "bcc")]
        recipients += _split_addresses(values, default_domain)
    kept = [f for f in fields if _field_name(f) != "bcc"]
    names = {_field_name(f) for f in kept}
    date = formatdate(now, localtime=False)
    who = f"uid {uid}" + (f" ({user})" if user else "") + (f" via {via}" if via else "")
    added = [f"Received: (mailappliance-sendmail invoked by {who}); {date}\n"
             .encode("utf-8", "replace")]
    if "from" not in names:
        shown = sender or f"MAILER-DAEMON@{hostname}"
        added.append(("From: " + formataddr((opts.fullname or "", shown)) + "\n")
                     .encode("utf-8", "replace"))
    if "date" not in names:
        added.append(f"Date: {date}\n".encode())
    if "message-id" not in names:
        added.append(f"Message-ID: <{unique}@{hostname}>\n".encode())
    seen = set()
    unique_rcpts = []
    for r in recipients:
        if r.lower() not in seen:
            seen.add(r.lower())
            unique_rcpts.append(r)
    message = b"".join(added + kept) + b"\n" + body
    return message, unique_rcpts


def header_length(raw: bytes) -> int:
    """Octets of `raw` that build_message treats as the header block (blank line included)."""
    _fields, body = _split_header(raw)
    return len(raw) - len(body)


def default_sender(text: str, default_domain: str, given: bool = False,
                   uid: int | None = None) -> str:
    """The envelope sender: -f as given (`given`; "" and "<>" are the null sender), or the
    login name of `uid` (uid-N when it is no usable address); bare names get the default
    domain. UsageError for a bad -f."""
    if given and text.strip() in ("", "<>"):
        return ""
    try:
        return _qualify(text, default_domain)
    except UsageError:
        if given:
            raise
        return _qualify(f"uid-{os.getuid() if uid is None else uid}", default_domain)


def _login_name() -> str:
    """$LOGNAME/$USER or the passwd entry, as qmail-inject; a uid without a name (containers)
    still gets a usable sender."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = ""
    try:
        parse_address(f"{name}@x.invalid")
        return name
    except AddressError:
        return f"uid-{os.getuid()}"


def _own_name() -> str | None:
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except PermissionError:
        return False
    except OSError:
        return True             # missing or broken: load_settings says what is wrong


def can_write_queue(data: Path) -> bool:
    """Whether this process may write the instance's queue itself (root, the server's user)."""
    if os.geteuid() == 0:
        return True
    queue = data / "queue"
    try:
        target = queue / "mess" if queue.is_dir() else data
    except OSError:
        return False            # the data directory is closed to this user
    return os.access(target, os.W_OK | os.X_OK)


class Unreachable(Exception):
    """The inject socket did not answer (not there, refused, no permission)."""


def _connect(path: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise Unreachable(f"{path}: {e.strerror or e}") from None
    return s


def _read_line(s: socket.socket, buf: bytearray, limit: int) -> bytes:
    while b"\n" not in buf:
        if len(buf) > limit:
            raise pickup.ProtocolError("reply line too long")
        try:
            data = s.recv(4096)
        except socket.timeout:
            raise TimeoutError from None
        if not data:
            break
        buf += data
    nl = buf.find(b"\n")
    if nl < 0:
        line, buf[:] = bytes(buf), b""
    else:
        line = bytes(buf[:nl + 1])
        del buf[:nl + 1]
    return line


def _greet(path: str) -> tuple[socket.socket, bytearray, int]:
    """Connect and read the greeting -> (socket, leftover bytes, the server's databytes).
    A busy server ("75 busy") is asked again, with growing pauses, for BUSY_WAIT seconds."""
    deadline = time.monotonic() + BUSY_WAIT
    pause = 0.05
    while True:
        s = _connect(path, CONNECT_TIMEOUT)
        buf = bytearray()
        try:
            first = _read_line(s, buf, pickup.MAX_REPLY_LINE)
            if not first:
                raise Unreachable(f"{path}: the server closed the connection")
            greeting = pickup.parse_greeting(first)
        except TimeoutError:
            s.close()
            raise Unreachable(f"{path}: no greeting within {CONNECT_TIMEOUT:.0f} s") from None
        except (pickup.ProtocolError, OSError) as e:
            s.close()
            raise Unreachable(f"{path}: {e}") from None
        if isinstance(greeting, int):
            return s, buf, greeting
        s.close()
        if greeting.code != pickup.EX_TEMPFAIL or time.monotonic() + pause > deadline:
            raise _Answer(greeting.code, greeting.text)
        time.sleep(pause)           # the server is busy: ask again a little later
        pause = min(pause * 2, 1.0)


class _Answer(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


def _send(s: socket.socket, buf: bytearray, opts: Options, raw: bytes) -> tuple[int, str]:
    head = header_length(raw)
    req = pickup.Request(opts.sender, tuple(opts.recipients), opts.extract, opts.fullname,
                         head, len(raw))
    try:
        s.settimeout(REPLY_TIMEOUT)
        try:
            s.sendall(pickup.encode_request(req) + raw)
        except (BrokenPipeError, ConnectionResetError):
            pass                    # refused early: the reply is waiting to be read
        line = _read_line(s, buf, pickup.MAX_REPLY_LINE)
    except TimeoutError:
        return EX_TEMPFAIL, f"no reply from the server within {REPLY_TIMEOUT:.0f} s"
    except OSError as e:
        return EX_TEMPFAIL, f"the inject socket failed: {e.strerror or e}"
    finally:
        s.close()
    if not line:
        return EX_TEMPFAIL, "the server closed the connection without a reply"
    try:
        reply = pickup.parse_reply(line)
    except pickup.ProtocolError as e:
        return EX_TEMPFAIL, str(e)
    return reply.code, reply.text


def _signed(data, message: bytes, sender: str, warn) -> bytes:
    """The message with DKIM-Signature fields on top when its From: or sender domain has a
    key under DATA/dkim (docs/MAILAUTH.md), signed by the server's own signing core
    (mailauth/sign.py, no Twisted), run here synchronously. Without a key directory nothing of
    the cryptography is even imported. A failure to sign is one warning line; the message is
    queued unsigned rather than lost."""
    if not os.path.isdir(os.path.join(data, "dkim")):
        return message
    from mailappliance.mailauth.keys import KeyRegistry
    from mailappliance.mailauth.sign import sign_with_registry
    from mailappliance.reencode import fit_lines
    message = fit_lines(message)      # lines over RFC 5321's limit: re-encoded before signing
    try:
        return sign_with_registry(KeyRegistry(data), message, sender, int(time.time())) + message
    except Exception as e:    # noqa: BLE001 - a signature is never worth losing the message
        warn(f"warning: not DKIM-signed: {e}")
        return message


def main(argv: Sequence[str] | None = None, *, stdin: BinaryIO | None = None,
         stderr: TextIO | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stderr = stderr if stderr is not None else sys.stderr
    environ = os.environ if environ is None else environ

    def fail(code: int, text: str) -> int:
        print(f"mailappliance-sendmail: {text}", file=stderr)
        return code

    try:
        opts = parse_args(argv)
    except UsageError as e:
        print(USAGE, file=stderr)
        return fail(EX_USAGE, str(e))

    # 1. Which instance (DESIGN.md section 2); nothing is created here, ever.
    from mailappliance.config import ConfigError, load_settings
    from mailappliance.locate import (DEFAULT_INJECT_SOCKET, ENV_INJECT, NO, NoInstance,
                                      instance_state, locate)
    env_socket = environ.get(ENV_INJECT, "")
    settings = None
    try:
        found = locate(opts.config, opts.data, environ=environ)
    except NoInstance as e:
        if not env_socket:
            return fail(EX_CONFIG, str(e))
        found = None
    if found is not None and (found.config is None or _readable(found.config)):
        try:
            overrides = {"data": str(found.data)} if found.data else {}
            settings = load_settings(found.config, overrides, check_files=False)
        except ConfigError as e:
            return fail(EX_CONFIG, str(e))

    # 2. Which way in: the server's inject socket when it answers; the queue itself for a
    #    caller who may write it (root, the server's user); otherwise exit 75 or 78.
    if settings is not None:
        sockets = [pickup.unix_path(e) for e in settings.listen.inject]
        if not sockets and env_socket:
            sockets = [env_socket]
        state = instance_state(settings.data)
        direct = state != NO and can_write_queue(settings.data)
        where = f"the queue in {settings.data}"
    else:
        sockets = [env_socket or DEFAULT_INJECT_SOCKET]
        state, direct = NO, False
        where = ("the queue (the configuration " + str(found.config) + " is not readable)"
                 if found is not None else "the queue")
    uid = os.getuid()
    unreachable = []
    for path in sockets:
        try:
            s, buf, databytes = _greet(path)
        except Unreachable as e:
            unreachable.append(str(e))
            continue
        except _Answer as e:
            return fail(e.code, e.text)
        try:
            raw = _read_message(stdin, opts.ignore_dots, databytes)
        except OverflowError:
            s.close()
            return fail(EX_DATAERR, "message (or its header) is larger than databytes allows")
        if not opts.recipients and not opts.extract:
            s.close()
            return fail(EX_USAGE, "no recipients (give them as arguments, or use -t)")
        try:
            header_length(raw)
        except OverflowError:
            s.close()
            return fail(EX_DATAERR, "message (or its header) is larger than databytes allows")
        code, text = _send(s, buf, opts, raw)
        return EX_OK if code == EX_OK else fail(code, text)
    if not direct:
        if settings is not None and state == NO:
            return fail(EX_CONFIG, f"no mailappliance instance in {settings.data} "
                        f"(from {found.how})")
        if not sockets:
            return fail(EX_CONFIG, f"no [listen] inject socket in {found.how} and uid {uid} "
                        f"may not write {where}")
        return fail(EX_TEMPFAIL, f"the server is not running (cannot connect to "
                    f"{'; '.join(unreachable)}) and uid {uid} may not write {where}; "
                    "try again later")
    return _inject_direct(opts, settings, stdin, fail)


def _inject_direct(opts: Options, settings, stdin: BinaryIO, fail) -> int:
    """The server is down (or has no inject socket): write the queue like qmail-queue."""
    default_domain = settings.default_domain or settings.hostname
    try:
        if opts.sender is None:
            sender = default_sender(_login_name(), default_domain)
        else:
            sender = default_sender(opts.sender, default_domain, given=True)
        raw = _read_message(stdin, opts.ignore_dots, settings.smtp.databytes)
        unique = f"{int(time.time())}.{os.getpid()}.{secrets.token_hex(4)}.mailappliance"
        message, recipients = build_message(
            opts, raw, sender=sender, hostname=settings.hostname, default_domain=default_domain,
            uid=os.getuid(), now=time.time(), unique=unique, user=_own_name())
    except UsageError as e:
        return fail(EX_USAGE, str(e))
    except OverflowError:
        return fail(EX_DATAERR, "message (or its header) is larger than databytes allows")
    if not recipients:
        return fail(EX_USAGE, "no recipients (give them as arguments, or use -t)")

    from mailappliance.queue.naming import queue_dir
    from mailappliance.queue.store import QueueStore, QueueWriteError
    from mailappliance.privileges import drop_to_data_owner
    uid = os.getuid()
    try:
        # Run as root (cron, a local daemon), write the queue as the server's user, so the
        # server that dropped to that user can read and remove what was injected.
        drop_to_data_owner(settings.data)
        if settings.dkim.sign:
            message = _signed(settings.data, message, sender, lambda text: fail(EX_OK, text))
        store = QueueStore(queue_dir(settings))
        store.inject(message, sender, recipients, f"local uid {uid}")
    except (QueueWriteError, OSError) as e:
        return fail(EX_TEMPFAIL, f"qq write error or disk full: {e}")
    except ValueError as e:
        return fail(EX_USAGE, str(e))
    return EX_OK


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
