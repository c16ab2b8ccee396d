"""Parsers of the files a qmail + vpopmail host keeps its state in (a pure core: text in,
records and notes out; no I/O).

Formats, as the programs that read them do:

* control files (qmail control(5)): one value a line, `#` comment lines and blank lines
  ignored, trailing blanks dropped; a one-line file (me, databytes) uses its first line;
* users/assign (qmail-users(5)): `+prefix:user:uid:gid:home:dash:ext:` (wildcard) and
  `=address:user:uid:gid:home:dash:ext:` (exact) lines, ending at a line `.`;
* virtualdomains: `domain:prefix` (vpopmail writes `example.com:example.com`);
* smtproutes (qmail-remote(8)): `domain:relay[:port]`, relay in brackets for an address,
  empty relay for "look up the MX", empty domain for every other domain;
* vpasswd (vpopmail): `name:hash:uid:flags:gecos:home:quota[:cleartext]`;
* dot-qmail (qmail's dot-qmail(5), as qmail-local reads it): `#` comment, `|` program,
  `/` or `.` a file (a Maildir when it ends in `/`), `&address` or a line starting with a
  letter or digit a forward;
* tcp.smtp (ucspi-tcp's tcprules input), checked line by line with the product's own parser.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from mailappliance.access.rules import RulesError, parse_rules

# Variables of a tcp.smtp line that mailappliance acts on (smtp/protocol.py, access/dnsbl.py).
KNOWN_RULE_VARIABLES = frozenset({"RELAYCLIENT", "RBLSMTPD", "GREETDELAY", "SMTPD_GREETDELAY"})

# vpopmail's per-user flags (the gid field of vpasswd; vauth.h), named for the report.
VPOPMAIL_FLAGS = {
    0x01: "NO_PASSWD_CHNG", 0x02: "NO_POP", 0x04: "NO_WEBMAIL", 0x08: "NO_IMAP",
    0x10: "BOUNCE_MAIL", 0x20: "NO_RELAY", 0x40: "NO_DIALUP", 0x80: "V_USER0",
    0x100: "V_USER1", 0x200: "V_USER2", 0x400: "V_USER3", 0x800: "NO_SMTP",
    0x1000: "QA_ADMIN", 0x2000: "V_OVERRIDE", 0x4000: "NO_SPAMASSASSIN", 0x8000: "DELETE_SPAM",
}
# Flags that change who may log in or whether mail arrives: the report calls them out.
ACCESS_FLAGS = 0x02 | 0x08 | 0x10 | 0x20 | 0x800

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


@dataclass(frozen=True)
class Note:
    """One line of the report about the input: `kind` is "error" (could not be read or
    done: the import should be run again once it is fixed), "skipped" (not carried over, by
    design: the operator decides), "warning" (carried over, but not exactly) or "info"."""
    kind: str
    where: str       # "file:line", "file" or ""
    text: str

    def line(self) -> str:
        return f"{self.where}: {self.text}" if self.where else self.text


def at(source: str, line: int | None = None) -> str:
    return f"{source}:{line}" if line else source


# --- control files -----------------------------------------------------------------------------

def control_lines(text: str) -> list[tuple[int, str]]:
    """(line number, value) of each line that is neither blank nor a comment."""
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        value = raw.rstrip(" \t\r")
        if value and not value.startswith("#"):
            out.append((number, value.strip()))
    return out


def control_line(text: str) -> str | None:
    """A one-line control file (me, defaultdomain): its first line, or None when empty."""
    for raw in text.splitlines():
        value = raw.strip(" \t\r")
        return value or None
    return None


def control_int(text: str, source: str) -> tuple[int | None, list[Note]]:
    value = control_line(text)
    if value is None:
        return None, []
    if not value.isdigit():
        return None, [Note("skipped", at(source, 1), f"not a number: {value!r}")]
    return int(value), []


# --- users/assign and virtualdomains -------------------------------------------------------------

@dataclass(frozen=True)
class Assign:
    wildcard: bool
    address: str     # the prefix (wildcard, without the leading +) or the exact address
    user: str
    uid: int
    gid: int
    home: str
    line: int


def parse_assign(text: str, source: str) -> tuple[list[Assign], list[Note]]:
    out: list[Assign] = []
    notes: list[Note] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if line == ".":
            break
        if not line.strip():
            continue
        if line[0] not in "+=":
            notes.append(Note("skipped", at(source, number),
                              f"not an assignment (must start with + or =): {line!r}"))
            continue
        fields = line[1:].split(":")
        if len(fields) < 7 or not fields[2].isdigit() or not fields[3].isdigit():
            notes.append(Note("skipped", at(source, number),
                              f"malformed assignment (expected 7 fields): {line!r}"))
            continue
        out.append(Assign(line[0] == "+", fields[0], fields[1], int(fields[2]),
                          int(fields[3]), fields[4], number))
    return out, notes


def parse_virtualdomains(text: str, source: str) -> tuple[list[tuple[int, str, str]], list[Note]]:
    """(line, domain, prefix) of each `domain:prefix` line."""
    out = []
    notes = []
    for number, value in control_lines(text):
        key, sep, prefix = value.partition(":")
        if not sep or not key or not prefix:
            notes.append(Note("skipped", at(source, number),
                              f"malformed line (expected domain:prefix): {value!r}"))
            continue
        out.append((number, key.lower(), prefix))
    return out, notes


# --- smtproutes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SMTPRoute:
    domain: str      # "" = every other domain; a leading "." = subdomains of it (qmail)
    host: str        # "" = no relay: look up the MX (qmail's `domain:` line)
    port: int
    line: int


def parse_smtproutes(text: str, source: str) -> tuple[list[SMTPRoute], list[Note]]:
    out: list[SMTPRoute] = []
    notes: list[Note] = []
    for number, value in control_lines(text):
        parts = value.split(":")
        if len(parts) < 2 or len(parts) > 3:
            notes.append(Note("skipped", at(source, number),
                              f"malformed route (expected domain:relay[:port]): {value!r}"))
            continue
        domain, host = parts[0].lower(), parts[1].strip()
        port = 25
        if len(parts) == 3:
            if not parts[2].isdigit() or not 0 < int(parts[2]) < 65536:
                notes.append(Note("skipped", at(source, number), f"bad port in {value!r}"))
                continue
            port = int(parts[2])
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if " " in host:
            notes.append(Note("skipped", at(source, number),
                              f"route with extra fields (an SMTP AUTH patch?) not carried "
                              f"over: {value!r}"))
            continue
        out.append(SMTPRoute(domain, host, port, number))
    return out, notes


# --- vpasswd ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class VUser:
    name: str
    hash: str
    flags: int
    gecos: str
    home: str
    quota: str       # as written (NOQUOTA, 5242880S, 5242880S,1000C, 50M)
    clear: str       # the clear-text field (vpopmail --enable-clear-passwd), "" if none
    line: int


def parse_vpasswd(text: str, source: str) -> tuple[list[VUser], list[Note]]:
    out: list[VUser] = []
    notes: list[Note] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split(":")
        if len(fields) < 7:
            notes.append(Note("error", at(source, number),
                              f"malformed vpasswd line ({len(fields)} fields, expected 7 or 8): "
                              "user skipped"))
            continue
        name = fields[0].strip().lower()
        if not name:
            notes.append(Note("error", at(source, number), "vpasswd line without a user name"))
            continue
        if name in seen:
            notes.append(Note("error", at(source, number),
                              f"user {name} appears twice: the later line is skipped"))
            continue
        try:
            flags = int(fields[3] or "0")
        except ValueError:
            flags = 0
            notes.append(Note("warning", at(source, number),
                              f"flags field {fields[3]!r} is not a number: ignored"))
        seen.add(name)
        # The clear-text field may itself contain ':' (vpopmail does not escape it).
        clear = ":".join(fields[7:]) if len(fields) > 7 else ""
        out.append(VUser(name, fields[1], flags, fields[4], fields[5], fields[6], clear, number))
    return out, notes


def parse_quota(text: str) -> tuple[int | None, str | None]:
    """vpopmail quota field -> (bytes, 0 = none; or None when unreadable), and a remark for
    what is not carried over (a message-count limit)."""
    text = text.strip()
    if not text or text.upper() == "NOQUOTA":
        return 0, None
    remark = None
    size_part = None
    for part in text.split(","):
        part = part.strip()
        if part.upper().endswith("C") and part[:-1].isdigit():
            remark = f"message-count limit {part[:-1]} not carried over (bytes only)"
        elif size_part is None:
            size_part = part
        else:
            return None, None
    if size_part is None:
        return 0, remark
    m = re.fullmatch(r"(\d+)\s*([bBkKmMgG]?)[sS]?", size_part)
    if not m:
        return None, None
    return int(m.group(1)) * _UNITS[m.group(2).lower()], remark


def flag_names(flags: int) -> list[str]:
    names = [name for bit, name in VPOPMAIL_FLAGS.items() if flags & bit]
    rest = flags & ~sum(VPOPMAIL_FLAGS)
    if rest:
        names.append(hex(rest))
    return names


# --- dot-qmail --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    line: int
    kind: str        # "forward", "maildir", "mbox" or "program"
    value: str       # the address, path or command (without its & or |)


def parse_dotqmail(text: str) -> list[Delivery]:
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip() or line.startswith("#"):
            continue
        first = line[0]
        if first == "|":
            out.append(Delivery(number, "program", line[1:].strip()))
        elif first in "./":
            out.append(Delivery(number, "maildir" if line.endswith("/") else "mbox", line))
        elif first == "&":
            out.append(Delivery(number, "forward", line[1:].strip()))
        elif first.isalnum():
            out.append(Delivery(number, "forward", line.strip()))
        else:
            out.append(Delivery(number, "unknown", line))
    return out


def dotqmail_local(filename: str) -> str | None:
    """`.qmail-first:last` -> "first.last" (qmail writes '.' as ':' in these names); None for
    a name that is not `.qmail-something`."""
    if not filename.startswith(".qmail-") or len(filename) == len(".qmail-"):
        return None
    return filename[len(".qmail-"):].replace(":", ".").lower()


@dataclass(frozen=True)
class VDeliver:
    """What a domain's `.qmail-default` running vdelivermail does with unknown users."""
    mode: str        # "bounce", "delete", "forward" (an address) or "maildir" (a path)
    target: str


def parse_vdelivermail(command: str) -> VDeliver | None:
    """`| /home/vpopmail/bin/vdelivermail '' bounce-no-mailbox` and its variants."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word.rsplit("/", 1)[-1] == "vdelivermail":
            args = words[i + 1:]
            break
    else:
        return None
    if len(args) < 2:
        return None
    target = args[1]
    if target == "bounce-no-mailbox":
        return VDeliver("bounce", "")
    if target == "delete":
        return VDeliver("delete", "")
    if target.startswith("/"):
        return VDeliver("maildir", target)
    return VDeliver("forward", target)


# --- tcp.smtp ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RulesCheck:
    text: str               # the file to install: every line the parser refuses commented out
    rules: int              # lines that are rules
    refused: tuple[Note, ...]
    notes: tuple[Note, ...]  # variables without effect and other remarks


def check_rules(text: str, source: str) -> RulesCheck:
    """Parse a tcprules source line by line with mailappliance's parser (access/rules.py).
    A line it refuses is reported with its number and commented out in the copy, so the copy
    loads; the order of the remaining lines, which decides (first match wins), is kept."""
    out_lines: list[str] = []
    refused: list[Note] = []
    notes: list[Note] = []
    unknown_vars: dict[str, int] = {}
    count = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            out_lines.append(raw)
            continue
        try:
            parse_rules("\n" * (number - 1) + raw, source)
        except RulesError as e:
            why = str(e)
            prefix = f"{source}: line {number}: "
            why = why[len(prefix):] if why.startswith(prefix) else why
            refused.append(Note("skipped", at(source, number),
                                f"rules line not understood, commented out in the copy: {why}"))
            out_lines.append(f"# mailappliance import: line {number} not understood: {why}")
            out_lines.append(f"# {raw}")
            continue
        count += 1
        out_lines.append(raw)
        for name, value in _line_env(raw):
            if name not in KNOWN_RULE_VARIABLES:
                unknown_vars.setdefault(name, number)
            elif name == "RELAYCLIENT" and value:
                notes.append(Note("warning", at(source, number),
                                  f'RELAYCLIENT="{value}": qmail appended this to every '
                                  "recipient; mailappliance only notes that the client may relay"))
    for name, number in unknown_vars.items():
        notes.append(Note("info", at(source, number),
                          f"variable {name} is kept in the copy but has no effect in "
                          "mailappliance"))
    body = "\n".join(out_lines)
    return RulesCheck(body + ("\n" if body else ""), count, tuple(refused), tuple(notes))


_ASSIGN = re.compile(r",([A-Za-z_][A-Za-z0-9_]*)=(.)")


def _line_env(line: str) -> list[tuple[str, str]]:
    """The NAME=value pairs of a rules line the parser accepted (same quoting rules)."""
    m = re.search(r":(allow|deny)(?=,|$)", line.strip())
    if m is None:
        return []
    rest = line.strip()[m.end():]
    out = []
    i = 0
    while i < len(rest):
        a = _ASSIGN.match(rest, i)
        if not a:
            break
        quote = a.group(2)
        end = rest.find(quote, a.end())
        if end < 0:
            break
        out.append((a.group(1), rest[a.end():end]))
        i = end + 1
    return out
