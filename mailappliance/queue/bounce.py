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

Adaptations: a Message-ID and MIME-less Date header are added (many receivers today score
mail without a Message-ID as spam); the copy of the original message is cut after
`BOUNCE_MAX_COPY` bytes, at a line end (qmail copies everything; Postfix's bounce_size_limit
is 50,000 bytes), so a bounce of a 10 MiB message does not cost another 10 MiB everywhere.
"""

from __future__ import annotations

from email.utils import formatdate

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


def _one_line(text: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else "?" for c in text)


def bounce_message(*, hostname: str, sender: str, recipient: str,
                   failures: list[tuple[str, str]], original: bytes, truncated: bool,
                   now: float, message_id: str) -> bytes:
    """The bounce of a message from `sender` whose `failures` are (address, report) pairs.

    `original` is the stored message (LF line ends), possibly already cut; `truncated` says so.
    Returns the canonical stored form (LF line ends) ready for injection."""
    host = _one_line(hostname)
    double = bounce_kind(sender) == DOUBLE
    lines = [
        f"Date: {formatdate(now, usegmt=True)}",
        f"From: {BOUNCE_FROM}@{host}",
        f"To: {_one_line(recipient)}",
        "Subject: failure notice",
        f"Message-ID: <{_one_line(message_id)}@{host}>",
        "",
        f"Hi. This is the qmail-send program at {host}.",
    ]
    if double:
        lines += ["I tried to deliver a bounce message to this address, but the bounce bounced!",
                  ""]
    else:
        lines += ["I'm afraid I wasn't able to deliver your message to the following addresses.",
                  "This is a permanent error; I've given up. Sorry it didn't work out.",
                  ""]
    for address, report in failures:
        lines.append(f"<{_one_line(address)}>:")
        for line in report.replace("\r\n", "\n").split("\n"):
            lines.append(line.replace("\r", " "))
        lines.append("")
    lines.append("--- Below this line is the original bounce." if double
                 else "--- Below this line is a copy of the message.")
    lines.append("")
    lines.append(f"Return-Path: <{_one_line(sender)}>")
    head = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    body = original
    if truncated or len(body) > BOUNCE_MAX_COPY:
        body = cut_copy(body)
        body += b"\n--- Rest of message not included (over %d bytes).\n" % BOUNCE_MAX_COPY
    elif body and not body.endswith(b"\n"):
        body += b"\n"
    return head + body


def cut_copy(data: bytes) -> bytes:
    """At most BOUNCE_MAX_COPY bytes of `data`, ending at a line end when there is one."""
    data = data[:BOUNCE_MAX_COPY]
    nl = data.rfind(b"\n")
    return data[:nl + 1] if nl >= 0 else data + b"\n"
