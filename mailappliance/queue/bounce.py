"""Bounce messages, as qmail-send writes them (pure: time and ids come in as arguments).

Source: qmail-1.03 qmail-send.c injectbounce().  The text is qmail's, with "qmail-send program"
kept so that people and filters who know qmail bounces recognise ours::

    From: MAILER-DAEMON@<host>
    To: <sender>
    Subject: failure notice

    Hi. This is the qmail-send program at <host>.
    I'm afraid I wasn't able to deliver your message to the following addresses.
    This is a permanent error; I've given up. Sorry it didn't work out.

    <rcpt@example.com>:
    <the failure report>

    --- Below this line is a copy of the message.

    Return-Path: <sender>
    <the message>

Envelopes follow qmail too:

* a message from a real sender bounces to that sender, envelope sender ``<>``;
* a bounce (sender ``<>``) that cannot be delivered is a *double bounce*: it goes to the
  postmaster with envelope sender ``#@[]`` (qmail's marker; sent as ``<>`` over SMTP);
* a double bounce that cannot be delivered is a *triple bounce*: logged and dropped, the only
  case in which mail is discarded (qmail-send logs "triple bounce: discarding bounce/N").

The bounce is an RFC 3464 delivery status notification, so mail programs show it as one
(and programs that read bounces, mailing list managers, find the failed addresses without
guessing): ``multipart/report; report-type=delivery-status`` (RFC 6522) with three parts,

1. ``text/plain``: qmail's human text above, unchanged;
2. ``message/delivery-status``: ``Reporting-MTA``, ``Arrival-Date``, and per failed
   recipient ``Final-Recipient``, ``Action: failed``, ``Status`` (the ``#X.Y.Z`` code at the
   end of the report, 5.0.0 without one), and for a refusal by a remote server
   ``Remote-MTA`` and ``Diagnostic-Code: smtp; <its reply>``;
3. ``message/rfc822``: the original message, with qmail's ``Return-Path:`` line in front; or,
   for a message over `BOUNCE_MAX_COPY` bytes, ``text/rfc822-headers``: its header only
   (RFC 6522 section 4: "the returned content may be just the header").

Adaptations: a Message-ID, a Date and ``Auto-Submitted: auto-replied`` (RFC 3834) are added
(many receivers today score mail without a Message-ID as spam); a message larger than
`BOUNCE_MAX_COPY` (qmail copies everything; Postfix's bounce_size_limit is 50,000 bytes) is
returned as its header only, so a bounce of a 10 MiB message does not cost another 10 MiB
everywhere.
"""

from __future__ import annotations

import re
import zlib
from email.utils import formatdate

from mailappliance.reencode import fit_lines

# Envelope sender of a double bounce (qmail-send.c: "#@[]").
DOUBLE_BOUNCE_SENDER = "#@[]"
BOUNCE_FROM = "MAILER-DAEMON"
# Bytes of the original message copied into a bounce (Postfix bounce_size_limit is 50000;
# we keep twice that so typical messages with attachments' headers stay whole).
BOUNCE_MAX_COPY = 100_000

BOUNCE, DOUBLE, TRIPLE = "bounce", "double", "triple"


def bounce_kind(sender: str) -> str:
    if sender == DOUBLE_BOUNCE_SENDER:
        return TRIPLE
    if sender == "":
        return DOUBLE
    return BOUNCE


def bounce_envelope(sender: str, postmaster: str) -> tuple[str, str] | None:
    """(envelope sender, recipient) of the bounce of a message from `sender`; None = drop."""
    kind = bounce_kind(sender)
    if kind == BOUNCE:
        return "", sender
    if kind == DOUBLE:
        return DOUBLE_BOUNCE_SENDER, postmaster
    return None


# A DSN field value is cut to this many characters: RFC 5322 2.1.1 caps a line at 998.
DSN_FIELD_MAX = 900
# qmail's texts end in an RFC 3463 code: "... (#5.1.1)".
_STATUS = re.compile(r"\(#([245]\.\d{1,3}\.\d{1,3})\)")
# smtp/client.py's reports of a refusal by a remote server (qmail-remote's wording):
# "<host> does not like recipient.\nRemote host said: 550 ..." or
# "Connected to <host> but sender was rejected.\nRemote host said: ...".
_REMOTE = re.compile(r"\A(?:Connected to )?(\S+) .*?\nRemote host said: ([^\n]*)", re.S)
# The status of a remote reply: its RFC 2034 enhanced code, else its class (RFC 3463 2).
_ENHANCED = re.compile(r"\A([245])\d\d[ -]([245]\.\d{1,3}\.\d{1,3})\b")
# Characters RFC 2046 5.1.1 allows in a boundary (without space), at most 70 of them.
_BOUNDARY_BAD = re.compile(r"[^0-9A-Za-z'()+_,./:=?-]")


def _one_line(text: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else "?" for c in text)


def _ascii_line(text: str, limit: int = DSN_FIELD_MAX) -> str:
    """A DSN field value: one line of printable ASCII (RFC 3464 fields are ASCII), cut."""
    out = "".join(c if " " <= c <= "~" else "?" for c in text.replace("\n", " "))
    return out[:limit]


def delivery_status(address: str, report: str) -> list[str]:
    """The RFC 3464 per-recipient fields for one failed recipient."""
    kind = "rfc822" if address.isascii() else "utf-8"      # RFC 6533 for SMTPUTF8 addresses
    remote = _REMOTE.match(report)
    m = _STATUS.search(report)
    if m is not None:
        status = m.group(1)
    elif remote is not None:
        said = remote.group(2)
        e = _ENHANCED.match(said)
        status = e.group(2) if e else ("4.0.0" if said.startswith("4") else "5.0.0")
    else:
        status = "5.0.0"
    shown = _one_line(address)[:DSN_FIELD_MAX]
    lines = [f"Final-Recipient: {kind}; {shown}", "Action: failed", f"Status: {status}"]
    if remote is not None:
        lines.append(f"Remote-MTA: dns; {_ascii_line(remote.group(1))}")
        lines.append(f"Diagnostic-Code: smtp; {_ascii_line(remote.group(2))}")
    return lines


def _boundary(message_id: str, host: str, content: bytes) -> str:
    base = _BOUNDARY_BAD.sub("_", f"{message_id}/{host}")[:60]
    base = "=_%08x_%s" % (zlib.crc32(base.encode()), base)
    boundary, n = base[:66], 0
    while ("--" + boundary).encode() in content:     # never a line of the content
        n += 1
        boundary = f"{base[:62]}.{n}"
    return boundary


def bounce_message(*, hostname: str, sender: str, recipient: str,
                   failures: list[tuple[str, str]], original: bytes, truncated: bool,
                   now: float, message_id: str, arrival: float | None = None) -> bytes:
    """The bounce of a message from `sender` whose `failures` are (address, report) pairs.

    `original` is the stored message (LF line ends), possibly already cut; `truncated` says so.
    `arrival` is when the message was queued (the DSN's Arrival-Date). Returns the canonical
    stored form (LF line ends) ready for injection: an RFC 3464 multipart/report."""
    host = _one_line(hostname)
    double = bounce_kind(sender) == DOUBLE
    whole = not truncated and len(original) <= BOUNCE_MAX_COPY
    text = [f"Hi. This is the qmail-send program at {host}."]
    if double:
        text += ["I tried to deliver a bounce message to this address, but the bounce bounced!",
                 ""]
    else:
        text += ["I'm afraid I wasn't able to deliver your message to the following addresses.",
                 "This is a permanent error; I've given up. Sorry it didn't work out.",
                 ""]
    for address, report in failures:
        text.append(f"<{_one_line(address)}>:")
        for line in report.replace("\r\n", "\n").split("\n"):
            text.append(line.replace("\r", " "))
        text.append("")
    if whole:
        text.append("--- Below this line is the original bounce." if double
                    else "--- Below this line is a copy of the message.")
    else:
        text.append(f"--- Below this line is the header of the {'bounce' if double else 'message'}"
                    f" (it is over {BOUNCE_MAX_COPY} bytes).")
    text_part = ("\n".join(text) + "\n").encode("utf-8", "surrogateescape")

    status = [f"Reporting-MTA: dns; {_ascii_line(host)}"]
    if arrival is not None:
        status.append(f"Arrival-Date: {formatdate(arrival, usegmt=True)}")
    for address, report in failures:
        status.append("")
        status.extend(delivery_status(address, report))
    status_part = ("\n".join(status) + "\n").encode("utf-8", "surrogateescape")

    copy = f"Return-Path: <{_one_line(sender)}>\n".encode("utf-8", "surrogateescape")
    if whole:
        body = original if not original or original.endswith(b"\n") else original + b"\n"
        copy_type = "message/rfc822"
    else:
        body = header_of(cut_copy(original))
        copy_type = "text/rfc822-headers"
    copy += body
    boundary = _boundary(message_id, host, text_part + copy)

    def part_head(ctype: str, content: bytes) -> str:
        cte = "7bit" if content.isascii() else "8bit"
        return f"--{boundary}\nContent-Type: {ctype}\nContent-Transfer-Encoding: {cte}\n\n"

    head = [
        f"Date: {formatdate(now, usegmt=True)}",
        f"From: {BOUNCE_FROM}@{host}",
        f"To: {_one_line(recipient)}",
        "Subject: failure notice",
        f"Message-ID: <{_one_line(message_id)}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-formatted delivery status notification (RFC 3464).",
        "",
        "",
    ]
    out = ["\n".join(head).encode("utf-8", "surrogateescape"),
           part_head('text/plain; charset="utf-8"', text_part).encode(), text_part, b"\n",
           part_head("message/delivery-status", status_part).encode(), status_part, b"\n",
           part_head(copy_type, copy).encode(), copy,
           f"\n--{boundary}--\n".encode()]
    # The copy of a message with lines over RFC 5321's limit is re-encoded here, before the
    # bounce is signed, so the signature covers the bytes that are sent (reencode.py).
    return fit_lines(b"".join(out))


def header_of(data: bytes) -> bytes:
    """The header section of a stored message (up to and without the blank line)."""
    end = data.find(b"\n\n")
    head = data if end < 0 else data[:end + 1]
    return head if head.endswith(b"\n") else head + b"\n"


def cut_copy(data: bytes) -> bytes:
    """At most BOUNCE_MAX_COPY bytes of `data`, ending at a line end when there is one."""
    data = data[:BOUNCE_MAX_COPY]
    nl = data.rfind(b"\n")
    return data[:nl + 1] if nl >= 0 else data + b"\n"
