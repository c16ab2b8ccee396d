"""DKIM verification (RFC 6376) through dkimpy, with its DNS done by us beforehand.

dkimpy asks for key records through a synchronous `dnsfunc`. We never let it: `key_names()`
lists the names the signatures need, the adapter looks them up with our asynchronous resolver
(cached, with timeouts), and `verify()` then checks each signature -- on a fast path through
OpenSSL for the common case (see "the fast path" below), else with dkimpy and a dnsfunc that
only reads those prefetched answers. A key whose lookup failed temporarily is a temperror
without dkimpy ever seeing it; a missing or malformed key is a permerror.

Results are RFC 8601 section 2.7.1 words: pass, fail (bad signature or body hash), neutral
(a signature we cannot parse), policy (a key below RFC 8301's 1024 bits), temperror, permerror
(no key, bad key).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from dkim import select_headers, validate_signature_fields
from dkim.canonicalization import CanonicalizationPolicy, Relaxed
from dkim.util import InvalidTagValueList, parse_tag_value

from mailappliance.mailauth import canon
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
    # The parsed tags (line ends taken out), which the fast path uses instead of parsing the
    # field a second time.
    tags: dict | None = field(default=None, compare=False, repr=False)

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


def signatures(message: bytes, fields=None) -> list[Signature]:
    """The DKIM-Signature fields of `message` (at most MAX_SIGNATURES, top first); `fields`:
    split_message(message)[0] when the caller has it already."""
    if fields is None:
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
    return Signature(index, domain, selector, _text(tags, b"a").lower(), b, error, tags)


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
    """One result per signature. CPU only (hashing, RSA/Ed25519), no I/O: the caller chooses
    the thread (service.py runs a small message on the reactor, INLINE_BYTES)."""
    if not sigs:
        return []
    wire = to_crlf(message)
    try:
        headers, body = dkim.rfc822_parse(wire)
    except Exception as e:     # MessageFormatError; IndexError on a first line that is folded
        return [DKIMResult("neutral", s.domain, s.selector, s.algorithm, s.b,
                           f"message cannot be parsed: {e}") for s in sigs]
    sig_headers = [h for h in headers if h[0].lower() == b"dkim-signature"]
    bodies: dict[bytes, bytes] = {}          # canonical body per algorithm, made once
    verifier = None
    out = []
    for sig in sigs:
        if not sig.error and sig.index < len(sig_headers):
            status, text = _key_text(keys.get(sig.key_name))
            if status == "ok" and _fast_pass(headers, body, sig_headers[sig.index],
                                             text.encode("utf-8", "replace"), bodies,
                                             sig.tags):
                out.append(DKIMResult("pass", sig.domain, sig.selector, sig.algorithm, sig.b))
                continue
        if verifier is None:
            verifier = dkim.DKIM(wire, minkey=MIN_RSA_BITS)
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


# --- the fast path ---------------------------------------------------------------------------
#
# dkimpy verifies RSA signatures in pure Python (its own ASN.1 reader and modular arithmetic:
# about 0.4 ms of a 2 KiB message's 0.7 ms, holding the GIL) and canonicalises bodies with a
# regular expression that rebuilds the text around every space. For the common signature --
# a=rsa-sha256 or ed25519-sha256, no l=, a key record of v=, k=, p= (and n=) only -- we check it
# here with the same dkimpy parsing and header selection, our equal canonicalisation (canon.py)
# and OpenSSL (`cryptography`). Only a pass is taken from here; anything else -- a failure,
# an unusual tag, a key we cannot load -- goes to dkimpy for the verdict and its reason, so
# the outcome is always dkimpy's, and only the passing case is faster.

FAST_ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")
FAST_KEY_TAGS = frozenset({b"v", b"k", b"p", b"n"})
# Public keys loaded from key records, by record text: a busy sender's key is parsed once. The
# bound is on entries (a key object is about 1 KB); when full the cache starts afresh.
KEY_CACHE_ENTRIES = 1024
_key_cache: dict[bytes, object] = {}
# dkimpy's RE_BTAG (the b= value taken out of the signature field, RFC 6376 section 3.7) with
# its FWS, ``(?:(?:\s*\r?\n)?\s+)?``, written as the ``\s*`` it amounts to: the same
# substitutions (tests/unit/test_mailauth_fastverify.py compares them on random input) in a
# third of the time (37 -> 13 us on a 2 KiB message's field).
_B_VALUE = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")


def _public_key(record: bytes, algorithm: bytes):
    """The key object of a record that has only v=DKIM1, k=, p= (n=), or None."""
    cached = _key_cache.get(record)
    if cached is not None:
        return cached
    tags = parse_tag_value(record)
    if not set(tags) <= FAST_KEY_TAGS or tags.get(b"v", b"DKIM1") != b"DKIM1":
        return None
    kind = tags.get(b"k", b"rsa")
    if kind != algorithm.split(b"-")[0]:
        return None
    raw = base64.b64decode(re.sub(rb"\s+", b"", tags[b"p"]), validate=True)
    if not raw:
        return None                                  # revoked: dkimpy says why
    if kind == b"rsa":
        key = serialization.load_der_public_key(raw)
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_BITS:
            return None
    else:
        key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if len(_key_cache) >= KEY_CACHE_ENTRIES:
        _key_cache.clear()
    _key_cache[record] = key
    return key


def _fast_pass(headers, body: bytes, sig_header, record: bytes,
               bodies: dict[bytes, bytes], tags: dict | None = None) -> bool:
    """True only when this signature surely passes; False means "ask dkimpy". `tags`: the
    field's tags when the caller has parsed them (Signature.tags)."""
    try:
        if tags is None:
            tags = parse_tag_value(sig_header[1])
        validate_signature_fields(tags)              # dkimpy's checks of v=, t=, x=, i=, ...
        algorithm = tags[b"a"]
        if algorithm not in FAST_ALGORITHMS or b"l" in tags:
            return False
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        include = [x.lower() for x in re.split(rb"\s*:\s*", tags[b"h"])]
        if b"from" not in include:
            return False
        include.append(b"from")                      # as dkimpy does (its bug 644046)
        key = _public_key(record, algorithm)
        if key is None:
            return False
        body_canon = policy.body_algorithm
        canonical = bodies.get(body_canon.name)
        if canonical is None:
            canonical = canon.relaxed_body(body) if body_canon is Relaxed else \
                body_canon.canonicalize_body(body)
            bodies[body_canon.name] = canonical
        if hashlib.sha256(canonical).digest() != \
                base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"])):
            return False
        relaxed = policy.header_algorithm is Relaxed
        chosen = select_headers(canon.relaxed_headers(headers) if relaxed else
                                policy.header_algorithm.canonicalize_headers(headers), include)
        stripped = [(sig_header[0], _B_VALUE.sub(b"\\1", sig_header[1]))]
        own = canon.relaxed_headers(stripped) if relaxed else \
            policy.header_algorithm.canonicalize_headers(stripped)
        data = b"".join(name + b":" + value for name, value in chosen) + \
            b"".join(name + b":" + value.rstrip() for name, value in own)
        signature = base64.b64decode(re.sub(rb"\s+", b"", tags[b"b"]))
        if algorithm == b"rsa-sha256":
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, hashlib.sha256(data).digest())
        return True
    except Exception:        # InvalidSignature, a malformed tag, a key OpenSSL refuses, ...
        return False
