"""Lines within RFC 5321's limit: re-encode the parts of a message whose lines are too long.

RFC 5321 section 4.5.3.1.6 limits a text line to 1000 octets with its CRLF, RFC 5322 section
2.1.1 to 998 characters without it.  A stored message may have longer lines (an HTML generator
that never ends a line, a base64 attachment nobody wrapped): sent as they are, a receiver may
refuse the message, cut the line or insert line ends where it likes (sendmail and Postfix break
such lines, which changes the content).  `fit_lines` instead re-encodes only the parts that
need it, so every line is within the limit and a MIME reader decodes the same content:

- a leaf part (text, image, ...) with a line over MAX_LINE: text as quoted-printable, anything
  else as base64 (RFC 2045 sections 6.7 and 6.8, lines of at most 76 characters); a part that
  already was quoted-printable or base64 is decoded first and encoded again with short lines;
- multipart parts are looked into, part by part (nested up to MIME_NESTING_LIMIT), and so is
  a message/rfc822 part (RFC 2046 section 5.2.1 allows it no encoding of its own);
- a header line over MAX_LINE is folded at white space (the field's value unchanged, RFC 5322
  section 2.2.3);
- where no such encoding exists -- a header line without white space to fold at, the preamble
  and epilogue of a multipart, parts nested deeper than the limit -- the line is broken every
  MAX_LINE octets, as other MTAs do: the only case where what arrives differs from what was
  stored.

Everything else stays byte for byte as it was (line ends included), and a message without a
long line is returned unchanged, so the function can run on every message and twice.  The
queue stores messages with LF line ends; CR, LF and CRLF all end a line here, as they do on
the wire (smtp/client.py DataEncoder).

Pure: bytes in, bytes out.  Where it runs, and why there (DKIM), is in docs/LIMITS.md.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
from email.message import Message

# RFC 5322 section 2.1.1: at most 998 characters on a line, without its CRLF (RFC 5321
# 4.5.3.1.6's 1000 octets with it).
MAX_LINE = 998
# RFC 2045 sections 6.7 and 6.8: encoded lines of at most 76 characters.
ENCODED_LINE = 76
# Postfix's mime_nesting_limit: multipart and message/rfc822 parts are looked into this deep;
# below it a long line is broken, not re-encoded (a hostile message could nest thousands).
MIME_NESTING_LIMIT = 100

_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_EOL = re.compile(rb"\r\n?|\n")


def _final_ending(data: bytes) -> bytes:
    """The line end `data` ends with (b"" if none): a look at its last octets, not a search
    from its start."""
    if data[-2:] == b"\r\n":
        return b"\r\n"
    return data[-1:] if data[-1:] in (b"\r", b"\n") else b""


def has_long_line(message: bytes) -> bool:
    """Does any line (CR, LF and CRLF end one) have more than MAX_LINE octets?"""
    if len(message) <= MAX_LINE:
        return False
    return max(map(len, message.splitlines())) > MAX_LINE


class LongLineScanner:
    """has_long_line over a message read in chunks (chunks may split a line anywhere)."""

    def __init__(self) -> None:
        self.run = 0                  # octets of the current line so far
        self.found = False

    def feed(self, chunk: bytes) -> bool:
        if self.found or not chunk:
            return self.found
        lines = chunk.splitlines()
        ends_line = chunk[-1:] in (b"\r", b"\n")
        if not lines:                 # only line ends
            self.run = 0
            return False
        first = self.run + len(lines[0])
        longest = max(first, max(map(len, lines[1:]), default=0))
        self.found = longest > MAX_LINE
        # A CR at a chunk's end followed by LF in the next only ends the line once; counting
        # the lone LF as an empty line is harmless.
        self.run = 0 if ends_line else (first if len(lines) == 1 else len(lines[-1]))
        return self.found


def fit_lines(message: bytes) -> bytes:
    """The message with no line over MAX_LINE octets (unchanged when it has none)."""
    if not has_long_line(message):
        return message
    nl = _first_line_end(message)
    return _entity(message, nl, depth=0, top=True, default_type="text/plain",
                   long=_LongLines(message), base=0)


class _LongLines:
    """Where the message's long lines start, found in one pass: whether a piece of it has one
    is then a search in that short list, not a pass over the piece again at each level of
    nesting (a hostile message nested MIME_NESTING_LIMIT deep cost 100 passes: 23 s for
    10 MB). Pieces are named by their offsets in the whole message."""

    __slots__ = ("starts",)

    def __init__(self, message: bytes) -> None:
        starts: list[int] = []
        pos = 0
        for line in message.splitlines(keepends=True):
            if len(line.rstrip(b"\r\n")) > MAX_LINE:
                starts.append(pos)
            pos += len(line)
        self.starts = starts

    def within(self, start: int, end: int) -> bool:
        """Does a long line start in message[start:end] (a run of whole lines)?"""
        i = bisect.bisect_left(self.starts, start)
        return i < len(self.starts) and self.starts[i] < end


# --- entities ---------------------------------------------------------------------------------

def _first_line_end(data: bytes) -> bytes:
    m = re.search(rb"\r\n|\r|\n", data)
    return m.group(0) if m else b"\n"


def _split_entity(data: bytes) -> tuple[list[bytes], bytes, bytes]:
    """(header fields, each with its continuation lines and line ends; the blank line or b"";
    the body).  A line that is neither a field nor a continuation starts the body, as in
    mailauth/message.py split_message.  Reads only as far as the header goes (the body may be
    megabytes, looked at once per level of nesting)."""
    fields: list[bytes] = []
    pos = 0
    n = len(data)
    while pos < n:
        m = _EOL.search(data, pos)
        nxt = m.end() if m else n
        line = data[pos:nxt]
        if line in (b"\r\n", b"\n", b"\r"):
            return fields, line, data[nxt:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            return fields, b"", data[pos:]
        pos = nxt
    return fields, b"", b""


def _field_name(field: bytes) -> bytes:
    m = _FIELD.match(field)
    return m.group(1).lower() if m else b""


def _field_value(fields: list[bytes], name: bytes) -> str | None:
    for f in fields:
        if _field_name(f) == name:
            value = f.split(b":", 1)[1]
            return re.sub(rb"\r\n|\r|\n", b"", value).decode("latin-1").strip()
    return None


def _content_type(fields: list[bytes], default_type: str) -> tuple[str, str | None, bool]:
    """(type/subtype, boundary, whether the field is there)."""
    raw = _field_value(fields, b"content-type")
    if raw is None:
        return default_type, None, False
    m = Message()
    m.set_default_type(default_type)
    m["Content-Type"] = raw
    return m.get_content_type(), m.get_boundary(), True


def _entity(data: bytes, nl: bytes, depth: int, top: bool, default_type: str,
            long: _LongLines, base: int) -> bytes:
    """`data` is message[base:base + len(data)]."""
    fields, blank, body = _split_entity(data)
    fields = [_fold_field(f, nl) for f in fields]
    ctype, boundary, typed = _content_type(fields, default_type)
    cte = (_field_value(fields, b"content-transfer-encoding") or "").lower()
    head = b"".join(fields) + blank
    body_at = base + len(data) - len(body)           # the body is the end of data
    if not long.within(body_at, body_at + len(body)):
        return head + body
    if depth >= MIME_NESTING_LIMIT:
        return head + _break_lines(body, nl)
    if ctype.startswith("multipart/"):
        if not boundary or cte not in ("", "7bit", "8bit", "binary"):
            return head + _break_lines(body, nl)
        inner = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        return head + _multipart(body, boundary.encode("latin-1", "replace"), nl, depth,
                                 inner, long, body_at)
    if ctype in ("message/rfc822", "message/global"):
        if cte not in ("", "7bit", "8bit", "binary"):
            return head + _break_lines(body, nl)
        return head + _entity(body, nl, depth + 1, top=True, default_type="text/plain",
                              long=long, base=body_at)
    # A leaf: its content as a reader would decode it, encoded again with short lines.
    ending = _final_ending(body)
    content = body[:len(body) - len(ending)]
    if cte == "base64":
        try:
            # As a lenient reader decodes it: stray characters skipped, padding completed.
            decoded = binascii.a2b_base64(re.sub(rb"[^A-Za-z0-9+/=]", b"", content) + b"==",
                                          strict_mode=False)
        except binascii.Error:
            return head + _break_lines(body, nl)      # not base64 at all: nothing to keep
        new_cte, encoded = "base64", _base64(decoded, nl)
    elif cte == "quoted-printable":
        text = binascii.a2b_qp(re.sub(rb"\r\n|\r", b"\n", content))
        if ctype.startswith("text/"):
            new_cte, encoded = "quoted-printable", _quoted_printable(text, nl)
        else:
            new_cte, encoded = "base64", _base64(text, nl)
    elif ctype.startswith("text/"):
        new_cte, encoded = "quoted-printable", _quoted_printable(content, nl)
    else:
        # 7bit, 8bit, binary or an encoding we do not know: the octets as the wire has them.
        new_cte, encoded = "base64", _base64(b"\r\n".join(content.splitlines()), nl)
    fields = _set_field(fields, b"Content-Transfer-Encoding", new_cte.encode(), nl)
    if not typed and new_cte == "quoted-printable" and not content.isascii():
        # Undeclared 8-bit text said nothing of its charset; as =XX escapes it must.
        charset = b"utf-8" if _is_utf8(content) else b"unknown-8bit"
        fields = _set_field(fields, b"Content-Type", b"text/plain; charset=" + charset, nl)
    if top and _field_value(fields, b"mime-version") is None:
        fields = _set_field(fields, b"MIME-Version", b"1.0", nl)
    return b"".join(fields) + (blank or nl) + encoded + ending


def _multipart(body: bytes, boundary: bytes, nl: bytes, depth: int, inner: str,
               long: _LongLines, base: int) -> bytes:
    """Each part between the delimiter lines (RFC 2046 section 5.1.1) fitted on its own; the
    line end before a delimiter belongs to the delimiter, not to the part. `body` is
    message[base:...]. The delimiter lines are found with bytes.find, not by walking every
    line of the body in Python (which each level of nesting did again)."""
    out: list[bytes] = []
    pos = 0                       # where the current piece (preamble, part) begins
    where = "preamble"

    def piece(end: int) -> None:
        """body[pos:end]: a part fitted on its own, or the preamble or epilogue."""
        data = body[pos:end]
        if where == "part":
            ending = _final_ending(data)
            out.append(_entity(data[:len(data) - len(ending)], nl, depth + 1, top=False,
                               default_type=inner, long=long, base=base + pos))
            out.append(ending)
        else:
            out.append(_break_lines(data, nl))

    for line_at, line_end, closing in _delimiters(body, b"--" + boundary):
        piece(line_at)
        out.append(body[line_at:line_end])
        pos = line_end
        if closing:
            where = "epilogue"
            break
        where = "part"
    piece(len(body))
    return b"".join(out)


def _delimiters(body: bytes, dash: bytes):
    """(start, end with its line end, whether it closes) of each delimiter line of `body`:
    a line (CR, LF and CRLF end one) that is `dash`, or `dash` + "--", then only white
    space."""
    i = body.find(dash)
    while i >= 0:
        if i == 0 or body[i - 1] in (10, 13):                 # at the start of a line
            m = _EOL.search(body, i)
            eol, end = (m.start(), m.end()) if m else (len(body), len(body))
            rest = body[i + len(dash):eol].rstrip(b" \t")
            if rest in (b"", b"--"):
                yield i, end, rest == b"--"
                i = body.find(dash, end)
                continue
        i = body.find(dash, i + 1)


# --- encodings ----------------------------------------------------------------------------------

def _quoted_printable(text: bytes, nl: bytes) -> bytes:
    """Each line of `text` (CR, LF, CRLF end one) as quoted-printable; lines joined by `nl`."""
    out = []
    for line in text.splitlines():
        encoded = binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
        out.append(encoded.replace(b"\n", nl))
    if _final_ending(text):
        out.append(b"")
    return nl.join(out)


def _base64(data: bytes, nl: bytes) -> bytes:
    b64 = base64.b64encode(data)
    return nl.join(b64[i:i + ENCODED_LINE] for i in range(0, len(b64), ENCODED_LINE))


def _break_lines(data: bytes, nl: bytes) -> bytes:
    """Lines over MAX_LINE broken every MAX_LINE octets (where nothing better exists)."""
    if not has_long_line(data):
        return data
    out = []
    for line in data.splitlines(keepends=True):
        bare = line.rstrip(b"\r\n")
        ending = line[len(bare):]
        while len(bare) > MAX_LINE:
            out.append(bare[:MAX_LINE] + nl)
            bare = bare[MAX_LINE:]
        out.append(bare + ending)
    return b"".join(out)


# --- header fields --------------------------------------------------------------------------------

def _fold_field(field: bytes, nl: bytes) -> bytes:
    """A field whose lines are all within MAX_LINE stays as it is; a longer line is folded
    before white space (the value unfolds to the same), or broken where there is none."""
    lines = field.splitlines(keepends=True)
    if all(len(line.rstrip(b"\r\n")) <= MAX_LINE for line in lines):
        return field
    out = []
    for line in lines:
        bare = line.rstrip(b"\r\n")
        ending = line[len(bare):]
        while len(bare) > MAX_LINE:
            cut = max(bare.rfind(b" ", 1, MAX_LINE + 1), bare.rfind(b"\t", 1, MAX_LINE + 1))
            colon = bare.find(b":")
            if cut <= colon + 1:
                out.append(bare[:MAX_LINE] + nl)
                bare = b" " + bare[MAX_LINE:]
                continue
            out.append(bare[:cut] + nl)
            bare = bare[cut:]               # the white space starts the continuation line
        out.append(bare + ending)
    return b"".join(out)


def _set_field(fields: list[bytes], name: bytes, value: bytes, nl: bytes) -> list[bytes]:
    """`name: value` in place of the first field of that name (case-insensitive), else added
    after the others."""
    new = name + b": " + value + nl
    lname = name.lower()
    out = list(fields)
    for i, f in enumerate(out):
        if _field_name(f) == lname:
            out[i] = new
            return out
    out.append(new)
    return out


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
