"""DKIM signing (RFC 6376), relaxed/relaxed, RSA-SHA256 and Ed25519-SHA256 (RFC 8463).

Pure computation: message bytes, keys and the time in, header fields out. The cryptography is
OpenSSL's through the `cryptography` package (an RSA-2048 signature costs about 0.6 ms there
and releases the GIL while it runs; dkimpy's own pure-Python RSA costs 13 ms holding it);
canonicalisation is dkimpy's algorithm (canon.py: the same bytes, fewer passes), which our
verifier uses too, checked against OpenDKIM's verifier in tests/integration/test_mailauth_opendkim.py.

What is signed: the header fields RFC 6376 section 5.4.1 recommends plus the ones that change
how the body is shown (Message-ID, MIME-Version, Content-Type, Content-Transfer-Encoding),
each as often as it occurs; From: once more than it occurs ("oversigned", section 8.15), so a
second From: added in transit breaks the signature instead of sitting beside it.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Iterable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mailappliance.mailauth.canon import relaxed_body, relaxed_header
from mailappliance.mailauth.keys import DKIMKey
from mailappliance.mailauth.message import Field, address_domain, from_domains, \
    linesep_of, split_message, to_crlf

# RFC 6376 section 5.4.1, in its order, then the MIME fields.
SIGNED_FIELDS = (
    b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"resent-date", b"resent-from",
    b"resent-to", b"resent-cc", b"in-reply-to", b"references", b"list-id", b"list-help",
    b"list-unsubscribe", b"list-subscribe", b"list-post", b"list-owner", b"list-archive",
    b"message-id", b"mime-version", b"content-type", b"content-transfer-encoding",
)
OVERSIGNED_FIELDS = (b"from",)
# Folding width of the generated field (RFC 5322 section 2.1.1 recommends 78).
LINE_WIDTH = 78


def signing_domain(fields: Sequence[Field], mail_from: str, has_keys,
                   from_domain: str | None = None) -> str | None:
    """Which domain signs: the From: domain if it has keys (that is what DMARC aligns with),
    else the envelope sender's domain if it has keys, else None (the message goes unsigned)."""
    if from_domain is None:
        domains, _problem = from_domains(list(fields))
        from_domain = domains[0] if domains else ""
    for candidate in (from_domain.lower().rstrip("."), address_domain(mail_from)):
        if candidate and has_keys(candidate):
            return candidate
    return None


def header_list(fields: Iterable[Field]) -> list[bytes]:
    """The h= names: each signed field once per occurrence (top to bottom), then the extra
    instances of the oversigned ones."""
    present = [f.lname for f in fields if f.lname in SIGNED_FIELDS]
    names = list(present)
    for name in OVERSIGNED_FIELDS:
        if name in present or name == b"from":
            names.append(name)
    return names


def select_fields(fields: Sequence[Field], names: Sequence[bytes]) -> list[Field]:
    """RFC 6376 section 5.4.2: for each name in h=, the bottom-most instance not used yet;
    a name with no instance left contributes nothing (the oversigning case)."""
    last_index: dict[bytes, int] = {}
    out = []
    for name in names:
        start = last_index.get(name, len(fields))
        for i in range(start - 1, -1, -1):
            if fields[i].lname == name:
                out.append(fields[i])
                last_index[name] = i
                break
        else:
            last_index[name] = 0
    return out


def canonical_field(field_name: bytes, value: bytes) -> bytes:
    """relaxed header canonicalisation (RFC 6376 section 3.4.2), with its CRLF."""
    name, value = relaxed_header(field_name, value)
    return name + b":" + value


def body_hash(body: bytes) -> bytes:
    """bh= for relaxed body canonicalisation (section 3.4.4) and SHA-256."""
    return base64.b64encode(hashlib.sha256(relaxed_body(to_crlf(body))).digest())


def _fold(tags: list[bytes], linesep: bytes) -> bytes:
    """The field up to an empty b= (which goes on a line of its own), folded at tag
    boundaries and, inside a long h= list, after colons. Folding adds only FWS, which relaxed
    canonicalisation turns into one space and h= parsing ignores (section 3.5)."""
    atoms: list[tuple[bytes, bytes]] = []          # (separator before it, text)
    for tag in tags[:-1]:
        if tag.startswith(b"h="):
            parts = tag.split(b":")
            atoms.append((b" ", parts[0] + (b":" if len(parts) > 1 else b";")))
            for i, part in enumerate(parts[1:], 1):
                atoms.append((b"", part + (b":" if i < len(parts) - 1 else b";")))
        else:
            atoms.append((b" ", tag + b";"))
    lines: list[bytes] = []
    line = b"DKIM-Signature:"
    for sep, text in atoms:
        if len(line) + len(sep) + len(text) > LINE_WIDTH and line.strip():
            lines.append(line)
            line = b"\t" + text
        else:
            line += sep + text
    lines.append(line)
    return linesep.join(lines) + linesep + b"\tb="


def _split_b(value: bytes, linesep: bytes, first: int) -> bytes:
    """The base64 signature in lines of at most LINE_WIDTH (whitespace inside b= is FWS)."""
    chunks = [value[:first]]
    rest = value[first:]
    while rest:
        chunks.append(rest[:LINE_WIDTH - 1])
        rest = rest[LINE_WIDTH - 1:]
    return (linesep + b"\t").join(c for c in chunks if c)


def sign_with(key: DKIMKey, fields: Sequence[Field], bh: bytes, now: int,
              linesep: bytes) -> bytes:
    """One DKIM-Signature field (with its final line end) made with `key`."""
    names = header_list(fields)
    tags = [b"v=1", b"a=" + key.sign_algorithm.encode(), b"c=relaxed/relaxed",
            b"d=" + key.domain.encode(), b"s=" + key.selector.encode(),
            b"t=" + str(int(now)).encode(), b"h=" + b":".join(names), b"bh=" + bh, b"b="]
    unsigned = _fold(tags, linesep)
    data = b"".join(canonical_field(f.name, f.value) for f in select_fields(fields, names))
    # The signature field itself, b= empty, without its trailing CRLF (section 3.7).
    data += canonical_field(b"DKIM-Signature", unsigned.split(b":", 1)[1])[:-2]
    private = key.private_key
    if isinstance(private, rsa.RSAPrivateKey):
        signature = private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        # RFC 8463 section 3: PureEdDSA over the SHA-256 hash of the header data.
        signature = private.sign(hashlib.sha256(data).digest())
    b = base64.b64encode(signature)
    return unsigned + _split_b(b, linesep, LINE_WIDTH - 3) + linesep


def sign_message(message: bytes, keys: Sequence[DKIMKey], now: int,
                 linesep: bytes | None = None) -> bytes:
    """DKIM-Signature fields to put on top of `message`, one per key, in the order of `keys`.

    `message` may end its lines in CRLF or LF; the fields returned use `linesep` (default: the
    message's own). Empty when `keys` is.
    """
    if not keys:
        return b""
    linesep = linesep or linesep_of(message)
    fields, body_at = split_message(message)
    bh = body_hash(message[body_at:])
    return b"".join(sign_with(key, fields, bh, now, linesep) for key in keys)


def sign_with_registry(registry, message: bytes, mail_from: str, now: int,
                       from_domain: str | None = None, linesep: bytes | None = None, *,
                       refresh: bool = True) -> bytes:
    """The signing core every path uses (the server's Signer, the sendmail command in its own
    process): DKIM-Signature fields for `message` from the keys of its signing domain in
    `registry` (keys.KeyRegistry, re-read when data/dkim changed), or b"" when no key
    applies. Blocking (one stat, perhaps a directory scan), no Twisted. `refresh=False`: the
    caller has just seen that the keys in memory are current (KeyRegistry.needs_scan), so
    no stat and no file read (the Signer on the reactor thread)."""
    if refresh:
        registry.refresh()
    fields, _ = split_message(message)
    domain = signing_domain(fields, mail_from, registry.has_keys, from_domain)
    if domain is None:
        return b""
    return sign_message(message, registry.cached_keys(domain), int(now), linesep)
