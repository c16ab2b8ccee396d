"""The header section of a message as fields, for signing, verifying and rewriting.

Pure: bytes in, values out. A message may end its lines in CRLF (as on the wire) or LF (the
queue's stored form); every function here accepts both and keeps what it was given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

# RFC 5322 section 2.2: a field name is printable US-ASCII except the colon.
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# Bound on the header fields we look at: more than this many is not a message anyone sends
# (Postfix's header_size_limit is 102400 octets; qmail has none) and each costs a loop turn.
MAX_HEADER_FIELDS = 1000
# Addresses taken from From: fields for DMARC; a message with more is treated as malformed.
MAX_FROM_ADDRESSES = 8


@dataclass(frozen=True)
class Field:
    name: bytes          # as written (case kept)
    raw: bytes           # the whole field: "Name: value", continuation lines, final line end

    @property
    def lname(self) -> bytes:
        return self.name.lower()

    @property
    def value(self) -> bytes:
        """Everything after the colon, line ends included (what DKIM canonicalises)."""
        return self.raw.split(b":", 1)[1]


def split_message(message: bytes) -> tuple[list[Field], int]:
    """(header fields, offset of the body). A line that is neither a field nor a continuation
    ends the header section there (as if the blank line were missing: it is body)."""
    fields: list[Field] = []
    pos = 0
    n = len(message)
    while pos < n:
        end = message.find(b"\n", pos)
        end = n if end < 0 else end + 1
        line = message[pos:end]
        if line in (b"\r\n", b"\n"):
            return fields, end
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = Field(last.name, last.raw + line)
        else:
            m = _FIELD_NAME.match(line)
            if m is None or len(fields) >= MAX_HEADER_FIELDS:
                return fields, pos
            fields.append(Field(m.group(1), line))
        pos = end
    return fields, n


def linesep_of(message: bytes) -> bytes:
    """b"\\r\\n" if the first line ends in CRLF, else b"\\n"."""
    end = message.find(b"\n")
    return b"\r\n" if end > 0 and message[end - 1:end] == b"\r" else b"\n"


def to_crlf(message: bytes) -> bytes:
    """Every line end as CRLF (DKIM canonicalisation works on CRLF lines)."""
    if b"\r\n" in message and b"\n" not in message.replace(b"\r\n", b""):
        return message
    # The same as re.sub(rb"\r?\n", b"\r\n", message) (a CR not before LF stays), in two
    # passes of C instead of a regular expression's match per line.
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def unfold(value: bytes) -> str:
    """A field value as one line of text (RFC 5322 section 2.2.3), undecodable bytes kept."""
    text = value.decode("utf-8", "surrogateescape")
    return re.sub(r"\r?\n(?=[ \t])", "", text).strip()


def from_domains(fields: list[Field]) -> tuple[list[str], str | None]:
    """The domains of the RFC 5322 From: addresses, lower case, in order, without repeats.

    Returns (domains, problem): problem is a short text when the From: section is unusable for
    DMARC (none, several fields, an address without a domain, too many addresses)."""
    froms = [f for f in fields if f.lname == b"from"]
    if not froms:
        return [], "no From: field"
    addresses = getaddresses([unfold(f.value) for f in froms])
    domains: list[str] = []
    for _name, addr in addresses[:MAX_FROM_ADDRESSES + 1]:
        if "@" not in addr:
            return [], "From: address without a domain"
        domain = addr.rsplit("@", 1)[1].strip().strip(".").lower()
        if not domain or any(c.isspace() for c in domain):
            return [], "From: address without a domain"
        if domain not in domains:
            domains.append(domain)
    if len(addresses) > MAX_FROM_ADDRESSES:
        return [], "too many From: addresses"
    if len(froms) > 1:
        return domains, "several From: fields"
    return domains, None


def address_domain(address: str) -> str:
    """Domain of an envelope address ("" for the null sender or no domain), lower case."""
    address = address.strip().strip("<>")
    if "@" not in address:
        return ""
    return address.rsplit("@", 1)[1].strip().strip(".").lower()
