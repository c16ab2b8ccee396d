"""DKIM verification (RFC 6376) through dkimpy, with its DNS done by us beforehand.

dkimpy asks for key records through a synchronous `dnsfunc`. We never let it: `key_names()`
lists the names the signatures need, the adapter looks them up with our asynchronous resolver
(cached, with timeouts), and `verify()` then runs dkimpy -- in a pool thread, it is CPU -- with
a dnsfunc that only reads those prefetched answers. A key whose lookup failed temporarily is a
temperror without dkimpy ever seeing it; a missing or malformed key is a permerror.

Results are RFC 8601 section 2.7.1 words: pass, fail (bad signature or body hash), neutral
(a signature we cannot parse), policy (a key below RFC 8301's 1024 bits), temperror, permerror
(no key, bad key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from mailappliance.mailauth.lookup import OK, TEMPERROR, DNSResult
from mailappliance.mailauth.message import split_message, to_crlf

# RFC 6376 section 6.1 lets a verifier limit the signatures it evaluates; more than a few on one
# message is an attack on our CPU and DNS, not a use case.
MAX_SIGNATURES = 5
# RFC 8301 section 3.2: verifiers MUST NOT consider RSA keys under 1024 bits valid.
MIN_RSA_BITS = 1024


@dataclass(frozen=True)
class Signature:
    index: int                   # among the message's DKIM-Signature fields, top first
    domain: str                  # d=
    selector: str                # s=
    algorithm: str               # a=
    b: str                       # the first characters of b= (RFC 6008 header.b)
    error: str = ""              # set when the field cannot be parsed

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class DKIMResult:
    result: str                  # pass | fail | neutral | policy | temperror | permerror
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""
    reason: str = ""


def signatures(message: bytes) -> list[Signature]:
    """The DKIM-Signature fields of `message` (at most MAX_SIGNATURES, top first)."""
    fields, _ = split_message(message)
    out = []
    index = 0
    for field in fields:
        if field.lname != b"dkim-signature":
            continue
        if len(out) >= MAX_SIGNATURES:
            break
        out.append(_signature(index, field.value))
        index += 1
    return out


def _text(tags, name: bytes) -> str:
    return tags.get(name, b"").decode("ascii", "replace").strip()


def _signature(index: int, value: bytes) -> Signature:
    try:
        tags = parse_tag_value(re.sub(rb"\r?\n", b"", value))
    except (InvalidTagValueList, ValueError) as e:
        return Signature(index, "", "", "", "", f"unparsable signature: {e}")
    domain = _text(tags, b"d").lower().rstrip(".")
    selector = _text(tags, b"s").lower()
    b = re.sub(r"\s+", "", _text(tags, b"b"))[:8]
    error = ""
    missing = [t.decode() for t in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s") if t not in tags]
    if missing:
        error = f"signature without {', '.join(missing)}="
    elif not re.fullmatch(r"[a-z0-9_.-]+", domain) or not re.fullmatch(r"[a-z0-9_.-]+",
                                                                        selector):
        error = "signature with an unusable d= or s="
    return Signature(index, domain, selector, _text(tags, b"a").lower(), b, error)


def key_names(sigs: Sequence[Signature]) -> list[str]:
    """The key records to look up (TXT), each once."""
    names: list[str] = []
    for sig in sigs:
        if not sig.error and sig.key_name not in names:
            names.append(sig.key_name)
    return names


def _key_text(answer: DNSResult | None) -> tuple[str, str]:
    """(status, text) of a key lookup: ("ok", record) or (result word, reason)."""
    if answer is None or answer.status == TEMPERROR:
        return "temperror", (answer.reason if answer else "") or "key lookup failed"
    if answer.status != OK or not answer.values:
        return "permerror", "no key record"
    # RFC 6376 section 3.6.2.2: several records make the outcome undefined; take the first.
    return "ok", answer.values[0]


def verify(message: bytes, sigs: Sequence[Signature],
           keys: Mapping[str, DNSResult]) -> list[DKIMResult]:
    """One result per signature. CPU only (hashing, RSA/Ed25519): call it from a pool thread."""
    if not sigs:
        return []
    wire = to_crlf(message)
    try:
        verifier = dkim.DKIM(wire, minkey=MIN_RSA_BITS)
    except dkim.DKIMException as e:
        return [DKIMResult("neutral", s.domain, s.selector, s.algorithm, s.b,
                           f"message cannot be parsed: {e}") for s in sigs]
    out = []
    for sig in sigs:
        out.append(_verify_one(verifier, sig, keys))
    return out


def _verify_one(verifier, sig: Signature, keys: Mapping[str, DNSResult]) -> DKIMResult:
    def result(word: str, reason: str) -> DKIMResult:
        return DKIMResult(word, sig.domain, sig.selector, sig.algorithm, sig.b, reason)

    if sig.error:
        return result("neutral", sig.error)
    status, text = _key_text(keys.get(sig.key_name))
    if status != "ok":
        return result(status, f"{sig.key_name}: {text}")
    record = text.encode("utf-8", "replace")
    try:
        dkim.evaluate_pk(sig.key_name.encode(), record)
    except dkim.DKIMException as e:
        return result("permerror", f"{sig.key_name}: bad key record ({e})")
    except Exception as e:     # dkimpy's ASN.1 reader raises plain errors on garbage
        return result("permerror", f"{sig.key_name}: bad key record ({type(e).__name__})")

    def dnsfunc(name, timeout=5):
        return record

    try:
        ok = verifier.verify(idx=sig.index, dnsfunc=dnsfunc)
    except dkim.KeyFormatError as e:
        if "too small" in str(e):
            return result("policy", f"key shorter than {MIN_RSA_BITS} bits")
        return result("permerror", str(e))
    except dkim.ValidationError as e:
        if "body hash mismatch" in str(e):
            return result("fail", "body hash did not verify")
        return result("neutral", str(e)[:200])
    except dkim.DKIMException as e:
        return result("neutral", str(e)[:200])
    except Exception as e:     # malformed input dkimpy does not expect (e.g. bad base64)
        return result("neutral", f"unverifiable signature ({type(e).__name__})")
    if ok:
        return result("pass", "")
    return result("fail", "signature did not verify")
