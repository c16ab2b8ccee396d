"""Sender binding for authenticated sessions: whose addresses a logged-in user may send as.

An authenticated user may use, in MAIL FROM and in the From: header, their own address and
the addresses of aliases that point to it (`alias add info@example.com test@example.com` lets
test@ send as info@; the role aliases postmaster@/abuse@ of a domain point to its first user).
This is Postfix's reject_sender_login_mismatch with the alias table as the login map, applied
to the header too, because the From: header is what the recipient's mail program shows.

`FromScanner` finds the From: header fields in a message as it streams past, in the
canonical form the SMTP core hands out (lines end in LF). It looks at the header only, keeps at
most MAX_FROM_BYTES of From: text and a bounded piece of any other line, and stops at the
blank line that ends the header; the body is never looked at.

Pure: the store lookup comes in as a function.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import getaddresses
from typing import Callable

# From: text kept per message (all From: fields together, folded lines included). RFC 5322
# section 2.1.1 caps a line at 998 octets; a From: field folded over many lines with a few
# dozen addresses stays well inside this. More is refused as unreadable, not truncated.
MAX_FROM_BYTES = 16 * 1024
# Bytes kept of a line while deciding what it is: the longest field name we look for ("from",
# with any amount of white space before its colon written the obsolete way, RFC 5322 4.5.3)
# fits; the rest of a long non-From line is skipped without being stored.
MAX_LINE_PREFIX = 64


@dataclass(frozen=True, slots=True)
class FromHeader:
    """What the header said. `addresses` is empty when there was no From: field."""

    addresses: tuple[str, ...]
    unreadable: bool                   # too long, or a From: field without an address in it


class FromScanner:
    """Feed message pieces (LF line ends) with `feed`; `finish` at the end of the message."""

    __slots__ = ("_line", "_line_len", "_field", "_fields", "_from_bytes", "_too_long", "done")

    def __init__(self) -> None:
        self._line = bytearray()          # the current line (its first MAX_LINE_PREFIX bytes,
        self._line_len = 0                # or all of it while it is From: text) and its length
        self._field: bytearray | None = None   # the From: field being read
        self._fields: list[bytes] = []
        self._from_bytes = 0
        self._too_long = False
        self.done = False                 # the header is over; further input is ignored

    def feed(self, data: bytes) -> None:
        start = 0
        n = len(data)
        while not self.done and start < n:
            i = data.find(b"\n", start)
            end = n if i < 0 else i
            self._append(data, start, end)
            if i < 0:
                return
            self._end_of_line()
            start = i + 1

    def _append(self, data: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        self._line_len += end - start
        line = self._line
        while start < end:
            keep = self._keep_limit()
            if len(line) >= keep:
                return                        # the rest of this line is not needed
            take = min(end, start + keep - len(line))
            line += data[start:take]
            start = take

    def _keep_limit(self) -> int:
        """How much of the current line to keep: a prefix, or all of a From: line and of its
        continuation lines (up to the bound, one byte over it to notice the excess)."""
        line = self._line
        if not line:
            return MAX_LINE_PREFIX
        if line[:1] in (b" ", b"\t"):
            return MAX_FROM_BYTES + 1 if self._field is not None else MAX_LINE_PREFIX
        if len(line) < MAX_LINE_PREFIX:
            return MAX_LINE_PREFIX
        if _is_from(line) or (b":" not in line and line.rstrip(b" \t").lower() == b"from"):
            return MAX_FROM_BYTES + 1         # "From" and a long run of blanks before ":"
        return MAX_LINE_PREFIX

    def _end_of_line(self) -> None:
        line = bytes(self._line)
        length = self._line_len
        cut = length > len(line)
        self._line.clear()
        self._line_len = 0
        if length == 0:                       # the blank line: the header is over
            self._close_field()
            self.done = True
            return
        if line[:1] in (b" ", b"\t"):          # a folded continuation of the previous field
            if self._field is not None:
                self._add_from_text(line, length, cut)
            return
        self._close_field()
        if _is_from(line):
            self._field = bytearray()
            self._add_from_text(line.split(b":", 1)[1], length, cut)

    def _add_from_text(self, text: bytes, length: int, cut: bool) -> None:
        self._from_bytes += length
        if cut or self._from_bytes > MAX_FROM_BYTES:
            self._too_long = True              # part of it was not kept: unreadable
            return
        self._field += text

    def _close_field(self) -> None:
        if self._field is not None:
            self._fields.append(bytes(self._field))
            self._field = None

    def finish(self) -> FromHeader:
        """The From: addresses of the header (a message may end inside its header)."""
        if not self.done:
            if self._line_len:
                self._end_of_line()
            self._close_field()
            self.done = True
        if self._too_long:
            return FromHeader((), True)
        addresses: list[str] = []
        for raw in self._fields:
            found = [addr for _name, addr in getaddresses([raw.decode("utf-8", "replace")])]
            if not found or any("@" not in a for a in found):
                return FromHeader((), True)
            addresses.extend(found)
        return FromHeader(tuple(addresses), False)


def _is_from(line: bytes) -> bool:
    """`From:` in any case, also with white space before the colon (obsolete syntax that mail
    programs still display, so it must not slip past the check)."""
    name, colon, _rest = line.partition(b":")
    return bool(colon) and name.rstrip(b" \t").lower() == b"from"


def may_send_as(address: str, user_address: str,
                alias_targets: Callable[[str], list[str] | None]) -> bool:
    """Whether the user logged in as `user_address` may use `address` as a sender: it is their
    own address, or an alias whose targets include them. Case does not matter (the store keeps
    names lower-case, as vpopmail does)."""
    want = user_address.lower()
    address = address.strip().lower()
    if address == want:
        return True
    if address.count("@") != 1:
        return False
    targets = alias_targets(address)
    return bool(targets) and any(t.lower() == want for t in targets)
