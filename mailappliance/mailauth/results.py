"""The outcome of the inbound checks: the Authentication-Results header (RFC 8601), the removal
of forged ones, and what the SMTP server does (accept, mark, refuse) with which reply text.

Pure. The header is generated here rather than with the `authres` package: we need only its
writing side for three methods, with values we control, and its parser raises on the
malformed headers a forger may send, where we must still recognise our authserv-id. Tests parse
what we write with `authres` as an independent reader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from mailappliance.mailauth.dkimverify import DKIMResult
from mailappliance.mailauth.dmarc import DMARCResult
from mailappliance.mailauth.message import split_message
from mailappliance.mailauth.spf import SPFResult
from mailappliance.smtp.replies import Reply

MODES_SPF = ("off", "tag", "enforce")
MODES_DKIM = ("off", "tag")
MODES_DMARC = ("off", "tag", "enforce")
# Comments are for people reading headers; a long DNS error text is cut here.
MAX_COMMENT = 160
LINE_WIDTH = 78
QUARANTINE_FLAG = b"X-Spam-Flag: YES"
QUARANTINE_FIELD = "X-Mailappliance-Quarantine"

# RFC 2045 token: printable ASCII except SPACE and tspecials.
_TOKEN = re.compile(r'[!#$%&\'*+\-.0-9A-Z^_`a-z{|}~]+')


def _value(text: str) -> str:
    """An RFC 8601 value: a token as is, else a quoted-string (non-ASCII and controls dropped)."""
    if text and _TOKEN.fullmatch(text):
        return text
    clean = "".join(c for c in text if " " <= c <= "~")
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    clean = "".join(c for c in text if " " <= c <= "~" and c not in "()\\")
    clean = clean.strip()[:MAX_COMMENT]
    return f" ({clean})" if clean else ""


def spf_resinfo(spf: SPFResult) -> str:
    prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
    return f"spf={spf.result}{_comment(spf.reason)} {prop}={_value(spf.domain or 'unknown')}"


def dkim_resinfo(r: DKIMResult) -> str:
    props = []
    if r.domain:
        props.append(f"header.d={_value(r.domain)}")
    if r.selector:
        props.append(f"header.s={_value(r.selector)}")
    if r.algorithm:
        props.append(f"header.a={_value(r.algorithm)}")
    if r.b:
        props.append(f"header.b={_value(r.b)}")
    return " ".join([f"dkim={r.result}{_comment(r.reason)}"] + props)


def dmarc_resinfo(r: DMARCResult) -> str:
    comment = f"p={r.policy} dis={r.disposition}" if r.result in ("pass", "fail") else r.reason
    text = f"dmarc={r.result}{_comment(comment)}"
    if r.domain:
        text += f" header.from={_value(r.domain)}"
    return text


def authentication_results(authserv_id: str, spf: SPFResult | None,
                           dkim: Sequence[DKIMResult] | None, dmarc: DMARCResult | None,
                           linesep: bytes = b"\r\n") -> bytes:
    """The header field, folded, ending in `linesep`. `dkim` [] means "no signatures" (none);
    None for a check that was not made (off)."""
    parts = []
    if spf is not None:
        parts.append(spf_resinfo(spf))
    if dkim:
        parts.extend(dkim_resinfo(r) for r in dkim)
    elif dkim is not None:
        parts.append("dkim=none")
    if dmarc is not None:
        parts.append(dmarc_resinfo(dmarc))
    head = f"Authentication-Results: {_value(authserv_id)};"
    if not parts:
        return (head + " none").encode("ascii") + linesep
    lines = [head]
    for i, part in enumerate(parts):
        lines.append("\t" + part + (";" if i < len(parts) - 1 else ""))
    return linesep.join(line.encode("ascii", "replace") for line in lines) + linesep


# --- forged headers ----------------------------------------------------------------------------

def _skip_cfws(text: str, pos: int) -> int:
    """Past whitespace and (nested) comments, RFC 5322 section 3.2.2."""
    depth = 0
    while pos < len(text):
        c = text[pos]
        if depth:
            if c == "\\":
                pos += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif not c.isspace():
            break
        pos += 1
    return pos


def authserv_id(value: bytes) -> str | None:
    """The authserv-id of an Authentication-Results value (RFC 8601 section 2.2), lower case,
    or None if there is none to read."""
    text = value.decode("utf-8", "replace")
    pos = _skip_cfws(text, 0)
    if pos >= len(text):
        return None
    if text[pos] == '"':
        out = []
        pos += 1
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\" and pos + 1 < len(text):
                pos += 1
            if text[pos] not in "\r\n":
                out.append(text[pos])
            pos += 1
        return "".join(out).strip().lower()
    m = re.compile(r"[^\s;()\"]+").match(text, pos)
    return m.group(0).lower() if m else None


def strip_forged(message: bytes, our_id: str) -> tuple[bytes, int]:
    """RFC 8601 section 5: remove every Authentication-Results field that claims our
    authserv-id (compared case-insensitively, as a domain name). Returns the message and how
    many fields went."""
    our_id = our_id.lower().rstrip(".")
    fields, body_at = split_message(message)
    keep = []
    removed = 0
    for f in fields:
        if f.lname == b"authentication-results":
            found = authserv_id(f.value)
            if found is not None and found.rstrip(".") == our_id:
                removed += 1
                continue
        keep.append(f.raw)
    if not removed:
        return message, 0
    return b"".join(keep) + message[sum(len(f.raw) for f in fields):], removed


# --- the verdict -------------------------------------------------------------------------------

def spf_refusal(spf: SPFResult, mode: str, client_ip: str) -> Reply | None:
    """`spf = "enforce"`: a fail (the domain's -all) is refused at MAIL FROM with 550 5.7.23
    (RFC 7208 section 8.4, RFC 7372). Everything else, temperror included, goes on."""
    if mode != "enforce" or spf.result != "fail":
        return None
    return Reply(550, "5.7.23", f"SPF fail: {client_ip} is not allowed to send mail for "
                                f"{spf.domain} (#5.7.23)")


def dmarc_refusal(dmarc: DMARCResult) -> Reply:
    return Reply(550, "5.7.1", f"message refused by the DMARC policy of {dmarc.domain}: "
                               f"p=reject and no aligned SPF or DKIM pass (#5.7.1)")


@dataclass(frozen=True)
class Verdict:
    """What check_message decided. `action`: accept | quarantine | reject; `reply` is the
    refusal for reject. `headers(linesep)` are the fields to put on top of the message (our
    Authentication-Results, and for quarantine the marks); `apply` also strips forged ones."""

    authserv_id: str
    action: str
    reply: Reply | None
    spf: SPFResult | None
    dkim: tuple[DKIMResult, ...] | None
    dmarc: DMARCResult | None
    log: str = ""
    # False when the message had no Authentication-Results field at all (the checker saw its
    # header): apply() then has nothing to strip and does not look again.
    strip: bool = True

    def headers(self, linesep: bytes = b"\r\n") -> bytes:
        out = authentication_results(self.authserv_id, self.spf, self.dkim, self.dmarc,
                                     linesep)
        if self.action == "quarantine":
            out += QUARANTINE_FLAG + linesep
            out += (f"{QUARANTINE_FIELD}: DMARC policy of {self.dmarc.domain} is "
                    f"quarantine").encode("ascii", "replace") + linesep
        return out

    def apply(self, message: bytes, linesep: bytes = b"\r\n") -> bytes:
        if self.strip:
            message, _removed = strip_forged(message, self.authserv_id)
        return self.headers(linesep) + message


def decide(authserv_id: str, spf: SPFResult | None, dkim: Sequence[DKIMResult] | None,
           dmarc: DMARCResult | None, dmarc_mode: str, strip: bool = True) -> Verdict:
    """`strip=False`: the message has no Authentication-Results field (Verdict.strip)."""
    action, reply = "accept", None
    if dmarc is not None and dmarc_mode == "enforce" and dmarc.result == "fail":
        if dmarc.disposition == "reject":
            action, reply = "reject", dmarc_refusal(dmarc)
        elif dmarc.disposition == "quarantine":
            action = "quarantine"
    parts = []
    if spf is not None:
        parts.append(f"spf={spf.result}")
    if dkim is not None:
        parts.append("dkim=" + (",".join(f"{r.result}:{r.domain}" for r in dkim) or "none"))
    if dmarc is not None:
        parts.append(f"dmarc={dmarc.result}:{dmarc.domain or '-'}:{dmarc.disposition}")
    return Verdict(authserv_id, action, reply, spf, tuple(dkim) if dkim is not None else None,
                   dmarc, " ".join(parts), strip)
