"""The message envelope and what a delivery attempt says about it: the ground floor.

Everything above may use this module (SMTP, the queue, the deliverers, the admin commands); it
imports nothing of ours.  Pure: no file system, no clock, no Twisted.

* `Envelope` and `Recipient`: sender, recipients and their states, as the queue wrote them.
* The recipient states (qmail-send's ``T``/``D`` marks in its local/ and remote/ files):
  `TODO`, `DELIVERED`, `FAILED` (its bounce record is already on disk), one byte each.
* The codec of the envelope part of a queue file (queue/store.py keeps one message as one
  file: ``message bytes | envelope | trailer``).  The envelope is a list of records
  ``<tag><len>:<bytes>\\n``; recipient records carry one status byte before the length,
  ``R<status><len>:<address>\\n``.  Every value is length-prefixed, so CR, LF or NUL inside an
  address cannot start a new record.  No pickle anywhere.  The fixed-size trailer names the
  two lengths and a CRC-32 of the envelope (status bytes counted as ``T``), so a truncated or
  damaged file is recognised instead of being misread.  The same records make the per-message
  bounce records (why a recipient failed).
* `check_envelope` / `check_address`: what the one door refuses before anything is written.
* A delivery attempt's `Result` per recipient, in qmail's three kinds: success (mark done),
  deferral (retry on the schedule) and failure (bounce).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

# --- names and limits ------------------------------------------------------------------------

# Recipient states (one byte each, rewritten in place by the queue).
TODO, DELIVERED, FAILED = b"T", b"D", b"F"
STATES = frozenset((TODO, DELIVERED, FAILED))

FORMAT_VERSION = b"1"
_MAGIC = b"MAQ1"
# "\nMAQ1 <20 digits> <20 digits> <8 hex>\n": fixed size so a reader finds it from the end.
TRAILER_SIZE = 1 + 4 + 1 + 20 + 1 + 20 + 1 + 8 + 1

# RFC 5321 4.5.3.1.3: a path is at most 256 octets; allow some slack for SMTPUTF8 and
# alias expansion, refuse anything that could only be an attack on the envelope format.
MAX_ADDRESS = 1024
# One envelope field (e.g. received_from) at most this long.
MAX_FIELD = 4096
# An envelope larger than this is not one we wrote (100 recipients of 256 octets need 26 KiB;
# the sendmail command and alias expansion may carry more recipients, but not 16 MiB of them).
MAX_ENVELOPE = 16 * 1024 * 1024
# A length prefix longer than this many digits cannot fit MAX_ENVELOPE.
_MAX_LEN_DIGITS = 8


class CorruptEntry(Exception):
    """A queue file that does not parse; the manager moves it to corrupt/."""


# --- the envelope ----------------------------------------------------------------------------

@dataclass
class Recipient:
    index: int
    address: str
    state: bytes = TODO
    offset: int = 0          # file offset of the status byte (set when parsed)


@dataclass
class Envelope:
    sender: str
    recipients: list[Recipient]
    birth: float
    received_from: str | None = None
    qp: int = 0
    uid: int = 0
    token: str = ""
    qid: int = 0
    size: int = 0            # message bytes before the envelope
    # In memory only, never written: the message bytes while the first deliveries run (see
    # QueueStore.keep_data), and whether a bounce/ file may exist (False only for a message
    # this process injected and recorded no failure for: its removal skips that unlink).
    data: bytes | None = field(default=None, compare=False, repr=False)
    bounce_file: bool = field(default=True, compare=False, repr=False)

    @property
    def todo(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == TODO]

    @property
    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == FAILED]

    @property
    def finished(self) -> bool:
        return all(r.state != TODO for r in self.recipients)


# --- the codec ---------------------------------------------------------------------------------

def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _record(tag: bytes, value: bytes, status: bytes = b"") -> bytes:
    return tag + status + str(len(value)).encode() + b":" + value + b"\n"


def encode_envelope(env: Envelope) -> bytes:
    out = [_record(b"V", FORMAT_VERSION),
           _record(b"B", repr(float(env.birth)).encode()),
           _record(b"P", str(int(env.qp)).encode()),
           _record(b"U", str(int(env.uid)).encode()),
           _record(b"K", _enc(env.token)),
           _record(b"S", _enc(env.sender))]
    if env.received_from is not None:
        out.append(_record(b"H", _enc(env.received_from)))
    for r in env.recipients:
        out.append(_record(b"R", _enc(r.address), r.state))
    return b"".join(out)


def _crc(envelope: bytes | bytearray, status_positions: Iterable[int]) -> int:
    masked = bytearray(envelope)
    for pos in status_positions:
        masked[pos] = TODO[0]
    return zlib.crc32(masked) & 0xFFFFFFFF


def status_positions(envelope: bytes) -> list[int]:
    """Offsets of the recipients' status bytes in an encoded envelope."""
    return [pos for _tag, _value, pos in _iter_records(envelope) if pos is not None]


def make_trailer(message_len: int, envelope: bytes,
                 positions: list[int] | None = None) -> bytes:
    """The fixed-size trailer after `envelope`; `positions` (its status bytes, from
    `status_positions`) spares a second walk over the records when the caller has them."""
    if positions is None:
        positions = status_positions(envelope)
    crc = _crc(envelope, positions)
    trailer = b"\n%s %020d %020d %08x\n" % (_MAGIC, message_len, len(envelope), crc)
    assert len(trailer) == TRAILER_SIZE
    return trailer


def parse_trailer(trailer: bytes) -> tuple[int, int, int]:
    if (len(trailer) != TRAILER_SIZE or trailer[:1] != b"\n" or trailer[1:5] != _MAGIC
            or trailer[-1:] != b"\n"):
        raise CorruptEntry("no trailer (truncated file?)")
    parts = trailer[6:-1].split(b" ")
    if (len(parts) != 3 or len(parts[0]) != 20 or len(parts[1]) != 20 or len(parts[2]) != 8
            or not parts[0].isdigit() or not parts[1].isdigit()):
        raise CorruptEntry("malformed trailer")
    try:
        crc = int(parts[2], 16)
    except ValueError:
        raise CorruptEntry("malformed trailer") from None
    return int(parts[0]), int(parts[1]), crc


def _iter_records(envelope: bytes) -> Iterator[tuple[bytes, bytes, int | None]]:
    """Yield (tag, value, status_position_or_None); raise CorruptEntry on any deviation."""
    pos, end = 0, len(envelope)
    while pos < end:
        tag = envelope[pos:pos + 1]
        pos += 1
        status_pos = None
        if tag == b"R":
            status_pos = pos
            pos += 1
        colon = envelope.find(b":", pos, pos + _MAX_LEN_DIGITS + 1)
        digits = envelope[pos:colon] if colon >= 0 else b""
        if not digits or not digits.isdigit() or not digits.isascii():
            raise CorruptEntry("bad length in envelope record")
        length = int(digits)
        start = colon + 1
        stop = start + length
        if stop >= end or envelope[stop:stop + 1] != b"\n":
            raise CorruptEntry("envelope record overruns")
        yield tag, envelope[start:stop], status_pos
        pos = stop + 1


def decode_envelope(envelope: bytes, expected_crc: int | None = None,
                    base_offset: int = 0) -> Envelope:
    fields: dict[bytes, bytes] = {}
    recipients: list[Recipient] = []
    positions: list[int] = []
    for tag, value, status_pos in _iter_records(envelope):
        if tag == b"R":
            state = envelope[status_pos:status_pos + 1]
            if state not in STATES:
                raise CorruptEntry("bad recipient state")
            positions.append(status_pos)
            recipients.append(Recipient(len(recipients), _dec(value), state,
                                        base_offset + status_pos))
        elif tag in (b"V", b"B", b"P", b"U", b"K", b"S", b"H"):
            if tag in fields:
                raise CorruptEntry("duplicate envelope field")
            fields[tag] = value
        else:
            raise CorruptEntry("unknown envelope record")
    if expected_crc is not None and _crc(envelope, positions) != expected_crc:
        raise CorruptEntry("envelope checksum mismatch")
    if fields.get(b"V") != FORMAT_VERSION:
        raise CorruptEntry("unknown queue format version")
    for need in (b"B", b"S", b"K"):
        if need not in fields:
            raise CorruptEntry("envelope field missing")
    if not recipients:
        raise CorruptEntry("envelope without recipients")
    try:
        birth = float(fields[b"B"])
        qp = int(fields.get(b"P", b"0"))
        uid = int(fields.get(b"U", b"0"))
    except ValueError:
        raise CorruptEntry("bad number in envelope") from None
    received = _dec(fields[b"H"]) if b"H" in fields else None
    return Envelope(sender=_dec(fields[b"S"]), recipients=recipients, birth=birth,
                    received_from=received, qp=qp, uid=uid, token=_dec(fields[b"K"]))


def check_envelope(sender: str, recipients: list[str]) -> None:
    check_address(sender, "sender")
    if not recipients:
        raise ValueError("no recipients")
    for r in recipients:
        check_address(r, "recipient")


def check_address(address: str, what: str) -> None:
    """Addresses are data: refuse the bytes that would let one forge an SMTP command later."""
    if not isinstance(address, str):
        raise ValueError(f"{what} must be a str")
    if len(_enc(address)) > MAX_ADDRESS:
        raise ValueError(f"{what} too long")
    if any(c in address for c in "\r\n\0"):
        raise ValueError(f"{what} contains CR, LF or NUL")


# --- bounce records (per message, append-only: the queue's bounce/<N> files) ------------------

def encode_bounce_record(token: str, index: int, address: str, text: str) -> bytes:
    body = (_record(b"K", _enc(token)) + _record(b"I", str(index).encode())
            + _record(b"A", _enc(address)) + _record(b"T", _enc(text)))
    return _record(b"X", body)


def decode_bounce_records(raw: bytes, token: str) -> dict[int, tuple[str, str]]:
    """index -> (address, text); a torn last record (crash mid-append) is ignored."""
    out: dict[int, tuple[str, str]] = {}
    try:
        for tag, value, _ in _iter_records(raw):
            if tag != b"X":
                break
            fields = {t: v for t, v, _p in _iter_records(value)}
            if _dec(fields.get(b"K", b"")) != token:
                continue  # left over from an earlier message with the same inode number
            out[int(fields[b"I"])] = (_dec(fields.get(b"A", b"")), _dec(fields.get(b"T", b"")))
    except (CorruptEntry, KeyError, ValueError):
        pass
    return out


# --- what a delivery attempt says about one recipient ----------------------------------------

SUCCESS, DEFERRAL, FAILURE = "success", "deferral", "failure"


@dataclass(frozen=True)
class Result:
    status: str      # SUCCESS | DEFERRAL | FAILURE
    text: str        # the report: qmail-local/qmail-remote wording, may span lines
    # A deferral that reached no server of the destination at all (every address refused,
    # unreachable or silent at connect; no DNS answer): the queue manager treats the
    # destination as dead for a while (queue/manager.py).  Set by the deliverer, never parsed
    # back out of the text.
    unreachable: bool = False

    def __post_init__(self) -> None:
        if self.status not in (SUCCESS, DEFERRAL, FAILURE):
            raise ValueError(f"bad delivery status {self.status!r}")


def success(text: str) -> Result:
    return Result(SUCCESS, text)


def deferral(text: str, *, unreachable: bool = False) -> Result:
    return Result(DEFERRAL, text, unreachable)


def failure(text: str) -> Result:
    return Result(FAILURE, text)
