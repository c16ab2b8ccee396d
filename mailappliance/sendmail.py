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
import sys
import time
from email.utils import formataddr, formatdate, getaddresses
from typing import BinaryIO, Sequence, TextIO

from mailappliance.address import AddressError, parse_address

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_TEMPFAIL = 75
EX_CONFIG = 78

# The header block is read into memory to find recipients and missing headers; 1 MiB is far
# above any real header (Postfix's header_size_limit is 100 KiB).
MAX_HEADER_BYTES = 1 << 20
READ_CHUNK = 64 * 1024

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
                  uid: int, now: float, unique: str) -> tuple[bytes, list[str]]:
    """The stored message and its recipients (a pure function; tested directly)."""
    fields, body = _split_header(raw)
    recipients = _split_addresses(opts.recipients, default_domain)
    if opts.extract:
        values = [_field_value(f) for f in fields if _field_name(f) in ("to", "cc", "bcc")]
        recipients += _split_addresses(values, default_domain)
    kept = [f for f in fields if _field_name(f) != "bcc"]
    names = {_field_name(f) for f in kept}
    date = formatdate(now, localtime=False)
    added = [f"Received: (mailappliance-sendmail invoked by uid {uid}); {date}\n".encode()]
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


def main(argv: Sequence[str] | None = None, *, stdin: BinaryIO | None = None,
         stderr: TextIO | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stderr = stderr if stderr is not None else sys.stderr

    def fail(code: int, text: str) -> int:
        print(f"mailappliance-sendmail: {text}", file=stderr)
        return code

    try:
        opts = parse_args(argv)
    except UsageError as e:
        print(USAGE, file=stderr)
        return fail(EX_USAGE, str(e))

    from mailappliance.config import ConfigError, load_settings
    try:
        overrides = {"data": opts.data} if opts.data else {}
        settings = load_settings(opts.config, overrides)
    except ConfigError as e:
        return fail(EX_CONFIG, str(e))
    default_domain = settings.default_domain or settings.hostname

    try:
        if opts.sender is None:
            sender = _qualify(_login_name(), default_domain)
        elif opts.sender.strip() in ("", "<>"):
            sender = ""
        else:
            sender = _qualify(opts.sender, default_domain)
        raw = _read_message(stdin, opts.ignore_dots, settings.smtp.databytes)
        unique = f"{int(time.time())}.{os.getpid()}.{secrets.token_hex(4)}.mailappliance"
        message, recipients = build_message(
            opts, raw, sender=sender, hostname=settings.hostname, default_domain=default_domain,
            uid=os.getuid(), now=time.time(), unique=unique)
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
        store = QueueStore(queue_dir(settings))
        store.inject(message, sender, recipients, f"local uid {uid}")
    except (QueueWriteError, OSError) as e:
        return fail(EX_TEMPFAIL, f"qq write error or disk full: {e}")
    except ValueError as e:
        return fail(EX_USAGE, str(e))
    return EX_OK


if __name__ == "__main__":      # pragma: no cover
    sys.exit(main())
