"""RFC 5321 envelope paths and the relay-trick classifier (a pure core).

`split_path(arg)` takes the text after ``MAIL FROM:`` / ``RCPT TO:`` and returns the parsed path
and the remaining ESMTP parameters. The grammar is RFC 5321 section 4.1.2:

    Path           = "<" [ A-d-l ":" ] Mailbox ">"
    A-d-l          = At-domain *( "," At-domain )        ; source route: parsed, then ignored
    Mailbox        = Local-part "@" ( Domain / address-literal )
    Local-part     = Dot-string / Quoted-string
    address-literal= "[" ( IPv4 / "IPv6:" IPv6 ) "]"     ; General-address-literal refused

Leniencies every deployed MTA has (qmail, Postfix with strict_rfc821_envelopes=no): spaces between
the colon and the path, and an unbracketed path without spaces. One trailing dot on a domain is the
root label and is removed (``test.com.`` is ``test.com``). Nothing else is repaired.

Addresses are data. A parsed `Mailbox` holds ASCII only (no SMTPUTF8), never a control character,
CR, LF or NUL, and its `str()` is the canonical RFC 5321 form that goes into the envelope.

The relay-trick classifier (`classify`) answers the one question the relay policy needs: which
domain is the *final* destination, as the queue will route it? That is always the domain after the
last unquoted ``@``. Percent hacks (``a%b@local``), bang paths (``b!a@local``), quoted ``"a@b"@local``,
source routes (``<@local:a@remote>``), IP literals and case variants are reported as `tricks` so the
policy can refuse them; they never turn into routes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# RFC 5321 section 4.5.3.1.1: "The maximum total length of a user name or other local-part is 64
# octets."
MAX_LOCAL_PART = 64
# RFC 5321 section 4.5.3.1.2: "The maximum total length of a domain name or number is 255 octets."
MAX_DOMAIN = 255
# RFC 5321 section 4.5.3.1.3: "The maximum total length of a reverse-path or forward-path is 256
# octets (including the punctuation and element separators)."
MAX_PATH = 256
# RFC 1035 section 2.3.4: labels are 63 octets or less.
MAX_LABEL = 63

# atext, RFC 5322 section 3.2.3 (used by RFC 5321's Atom).
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# Quoted-string: qtextSMTP is %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP is "\" %d32-126.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_PAIR = re.compile(r"\\([\x20-\x7e])")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# The characters that some mailer somewhere has treated as a route inside a local part.
_ROUTE_CHARS = frozenset("%!@")

# Names for the relay tricks found by `classify` (reported, logged, and refused by the policy).
TRICK_PERCENT = "percent-hack"        # a%b@local: sendmail's percent hack would forward to b
TRICK_BANG = "bang-path"              # b!a@local: UUCP bang path would forward to b
TRICK_QUOTED_AT = "quoted-at"         # "a@b"@local: a naive re-parse would route to b
TRICK_QUOTED = "quoted-local-part"    # any local part that needs quoting
TRICK_SOURCE_ROUTE = "source-route"   # <@local:a@remote>: RFC 5321 says ignore the route
TRICK_LITERAL = "ip-literal"          # a@[1.2.3.4]: never one of our domains
TRICK_TRAILING_DOT = "trailing-dot"   # a@local.: the root label, removed before judging


class AddressError(ValueError):
    """A path that does not parse. `reason` is one of SYNTAX, TOO_LONG."""

    SYNTAX = "syntax"
    TOO_LONG = "too-long"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One mailbox: `local` is the local part with quoting removed; `domain` is lower-case,
    without a trailing dot, or a normalized literal such as ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``."""

    local: str
    domain: str

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def local_needs_quotes(self) -> bool:
        return _DOT_STRING.fullmatch(self.local) is None

    def __str__(self) -> str:
        if self.local_needs_quotes:
            quoted = self.local.replace("\\", "\\\\").replace('"', '\\"')
            return f'"{quoted}"@{self.domain}'
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True, slots=True)
class Path:
    """A parsed path: `mailbox` is None for the null reverse-path ``<>``. `route` keeps the source
    route's domains (RFC 5321 section 4.1.1.3 / appendix C: accepted, then ignored) for the log;
    `trailing_dot` records that the domain was written with the root label."""

    mailbox: Mailbox | None
    route: tuple[str, ...] = ()
    trailing_dot: bool = False
    quoted: bool = False      # the local part was written as a quoted string


def _parse_domain(text: str) -> tuple[str, bool]:
    """Domain or address literal -> (normalized domain, had trailing dot)."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise AddressError(AddressError.SYNTAX, "unterminated address literal")
        inner = text[1:-1]
        if inner[:5].lower() == "ipv6:":
            try:
                addr6 = ipaddress.IPv6Address(inner[5:])
            except ValueError:
                raise AddressError(AddressError.SYNTAX, "bad IPv6 address literal") from None
            return f"[IPv6:{addr6.compressed}]", False
        try:
            addr4 = ipaddress.IPv4Address(inner)
        except ValueError:
            # General-address-literal (tag:content) has no registered tags we could use.
            raise AddressError(AddressError.SYNTAX, "bad address literal") from None
        return f"[{addr4}]", False
    trailing_dot = text.endswith(".")
    if trailing_dot:
        text = text[:-1]
    if not text:
        raise AddressError(AddressError.SYNTAX, "empty domain")
    if len(text) > MAX_DOMAIN:
        raise AddressError(AddressError.TOO_LONG, "domain longer than 255 octets")
    for label in text.split("."):
        if len(label) > MAX_LABEL:
            raise AddressError(AddressError.TOO_LONG, "domain label longer than 63 octets")
        if _LABEL.fullmatch(label) is None:
            raise AddressError(AddressError.SYNTAX, "bad domain")
    return text.lower(), trailing_dot


def _parse_mailbox(text: str, postmaster_domain: str | None) -> tuple[Mailbox, bool, bool]:
    """Mailbox text -> (Mailbox, trailing dot, quoted)."""
    if text.startswith('"'):
        m = _QUOTED_STRING.match(text)
        if m is None:
            raise AddressError(AddressError.SYNTAX, "bad quoted local part")
        local = _QUOTED_PAIR.sub(r"\1", text[1:m.end() - 1])
        rest = text[m.end():]
        quoted = True
    else:
        at = text.rfind("@")
        if at < 0:
            # RFC 5321 section 4.1.1.3: RCPT TO:<Postmaster> without a domain must be accepted.
            if postmaster_domain is not None and text.lower() == "postmaster":
                return Mailbox("postmaster", postmaster_domain), False, False
            raise AddressError(AddressError.SYNTAX, "address without a domain")
        local, rest = text[:at], text[at:]
        if _DOT_STRING.fullmatch(local) is None:
            raise AddressError(AddressError.SYNTAX, "bad local part")
        quoted = False
    if not rest.startswith("@"):
        raise AddressError(AddressError.SYNTAX, "address without a domain")
    if len(local.encode("ascii")) > MAX_LOCAL_PART:
        raise AddressError(AddressError.TOO_LONG, "local part longer than 64 octets")
    if not local:
        raise AddressError(AddressError.SYNTAX, "empty local part")
    domain, trailing_dot = _parse_domain(rest[1:])
    return Mailbox(local, domain), trailing_dot, quoted


def _parse_route(text: str) -> tuple[str, ...]:
    route = []
    for part in text.split(","):
        if not part.startswith("@"):
            raise AddressError(AddressError.SYNTAX, "bad source route")
        domain, _ = _parse_domain(part[1:])
        route.append(domain)
    return tuple(route)


def _path_end(arg: str) -> int:
    """Index of the '>' closing the path that starts at arg[0] == '<' (quotes respected), or -1."""
    i, n = 1, len(arg)
    in_quotes = False
    while i < n:
        c = arg[i]
        if in_quotes:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_quotes = False
        elif c == '"':
            in_quotes = True
        elif c == ">":
            return i
        i += 1
    return -1


def split_path(arg: str, *, null_ok: bool, postmaster_domain: str | None = None
               ) -> tuple[Path, str]:
    """Parse the path at the start of `arg`; return (path, parameter text after it).

    `null_ok` allows ``<>`` (reverse paths). `postmaster_domain`, when given, makes a bare
    ``<Postmaster>`` mean postmaster at that domain (forward paths).
    Raises AddressError.
    """
    arg = arg.lstrip(" ")
    if not arg.isascii():
        raise AddressError(AddressError.SYNTAX, "non-ASCII address (no SMTPUTF8 here)")
    if arg.startswith("<"):
        end = _path_end(arg)
        if end < 0:
            raise AddressError(AddressError.SYNTAX, "unterminated path")
        path_text, inner, rest = arg[:end + 1], arg[1:end], arg[end + 1:]
    else:
        # Unbracketed path: everything up to the first space (no quoted spaces possible).
        sp = arg.find(" ")
        inner = arg if sp < 0 else arg[:sp]
        rest = "" if sp < 0 else arg[sp:]
        path_text = f"<{inner}>"
    if rest and not rest.startswith(" "):
        raise AddressError(AddressError.SYNTAX, "junk after path")
    if len(path_text) > MAX_PATH:
        raise AddressError(AddressError.TOO_LONG, "path longer than 256 octets")
    if any(ord(c) < 32 or ord(c) == 127 for c in path_text):
        raise AddressError(AddressError.SYNTAX, "control character in path")
    if inner == "":
        if not null_ok:
            raise AddressError(AddressError.SYNTAX, "null path not allowed here")
        return Path(None), rest.strip(" ")
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError(AddressError.SYNTAX, "source route without ':'")
        route = _parse_route(inner[:colon])
        inner = inner[colon + 1:]
    mailbox, trailing_dot, quoted = _parse_mailbox(inner, postmaster_domain)
    return Path(mailbox, route, trailing_dot, quoted), rest.strip(" ")


def parse_address(text: str) -> Mailbox:
    """A bare ``local@domain`` (no angle brackets, no parameters), e.g. from the sendmail command
    line or a header. Raises AddressError."""
    text = text.strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    path, rest = split_path(text, null_ok=False)
    if rest or path.mailbox is None:
        raise AddressError(AddressError.SYNTAX, "not a single address")
    return path.mailbox


# --- relay-trick classifier -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Destination:
    """What the relay check must judge: the final `domain` (the one the queue will route to), and
    the `tricks` present. `route_chars` is True when the local part holds a character that some
    mailer has treated as a route (``%``, ``!``, ``@``): such a local part is never a mailbox here.
    """

    domain: str
    literal: bool
    route_chars: bool
    tricks: frozenset[str]


def classify(path: Path) -> Destination:
    """Classify a forward path for the relay decision. The final destination is always
    `path.mailbox.domain`; a route or a routing character never changes it."""
    mailbox = path.mailbox
    if mailbox is None:
        raise ValueError("classify() needs a mailbox, not the null path")
    tricks = set()
    local = mailbox.local
    if "%" in local:
        tricks.add(TRICK_PERCENT)
    if "!" in local:
        tricks.add(TRICK_BANG)
    if "@" in local:
        tricks.add(TRICK_QUOTED_AT)
    if mailbox.local_needs_quotes:
        tricks.add(TRICK_QUOTED)
    if path.route:
        tricks.add(TRICK_SOURCE_ROUTE)
    if mailbox.is_literal:
        tricks.add(TRICK_LITERAL)
    if path.trailing_dot:
        tricks.add(TRICK_TRAILING_DOT)
    return Destination(
        domain=mailbox.domain,
        literal=mailbox.is_literal,
        route_chars=not _ROUTE_CHARS.isdisjoint(local) or mailbox.local_needs_quotes,
        tricks=frozenset(tricks),
    )
