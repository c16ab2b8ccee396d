"""DMARC (RFC 7489): policy discovery, identifier alignment and the policy to apply.

Pure: `check(...)` is a generator (see lookup.py) yielding the TXT lookups of policy
discovery (section 6.6.3: _dmarc.<From domain>, then _dmarc.<organisational domain>) and
returning a `DMARCResult`. Organisational domains come from the Public Suffix List bundled with
the `publicsuffixlist` package (section 3.2), read once per process: nothing is downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from mailappliance.mailauth.lookup import TEMPERROR, Check, Lookup

PASS, FAIL, NONE, TEMPERROR_, PERMERROR = "pass", "fail", "none", "temperror", "permerror"
POLICIES = ("none", "quarantine", "reject")
# RFC 7489 section 6.6.1 allows refusing messages with several From: domains; we evaluate each
# (at most this many, from message.MAX_FROM_ADDRESSES) and the strictest outcome wins.
_ORDER = {"none": 0, "quarantine": 1, "reject": 2}
_RESULT_ORDER = {NONE: 0, PASS: 1, PERMERROR: 2, TEMPERROR_: 3, FAIL: 4}
_TAG = re.compile(r"\s*([a-z][a-z0-9_]*)\s*=\s*(.*?)\s*", re.I | re.S)
# A DMARC record is small; anything past this is not one (bounds the parsing work).
MAX_RECORD_LENGTH = 4096


@dataclass(frozen=True)
class DMARCRecord:
    p: str
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class DMARCResult:
    result: str                  # pass | fail | none | temperror | permerror
    domain: str                  # the RFC 5322.From domain (header.from); "" if none
    policy: str = "none"         # the policy published for it (p=, or sp= for a subdomain)
    disposition: str = "none"    # what to do: none | quarantine | reject (after pct=)
    reason: str = ""


class DMARCSyntaxError(ValueError):
    pass


@lru_cache(maxsize=1)
def _psl():
    from publicsuffixlist import PublicSuffixList
    return PublicSuffixList()


@lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """RFC 7489 section 3.2: the registrable domain (public suffix plus one label); a public
    suffix itself, or a name the list cannot place, is its own organisational domain."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return identifier == from_domain
    return org_domain(identifier) == org_domain(from_domain)


@lru_cache(maxsize=1024)          # a busy sender's record is parsed once (at most 4 MB kept)
def parse_record(text: str) -> DMARCRecord:
    """Section 6.3 tags; DMARCSyntaxError when no usable p= (see section 6.6.3 for what that
    means: with a valid rua= it counts as p=none, else as no record)."""
    if len(text) > MAX_RECORD_LENGTH:
        raise DMARCSyntaxError("record too long")
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        if not part.strip():
            continue
        m = _TAG.fullmatch(part)
        if m is None:
            raise DMARCSyntaxError(f"bad tag {part.strip()!r}")
        name, value = m.group(1).lower(), m.group(2)
        if i == 0 and (name != "v" or value != "DMARC1"):
            raise DMARCSyntaxError("does not start with v=DMARC1")
        tags.setdefault(name, value)
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() or None
    if p not in POLICIES or (sp is not None and sp not in POLICIES):
        if _valid_rua(tags.get("rua", "")):
            return DMARCRecord("none")
        raise DMARCSyntaxError("no valid p= tag")
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct_text = tags.get("pct", "100")
    try:
        pct = int(pct_text)
    except ValueError:
        pct = 100               # section 6.3: an invalid value is ignored (default)
    return DMARCRecord(p, sp, adkim if adkim in ("r", "s") else "r",
                       aspf if aspf in ("r", "s") else "r", min(max(pct, 0), 100))


def _valid_rua(value: str) -> bool:
    return any(re.match(r"\s*[a-z][a-z0-9+.-]*:\S", uri, re.I) for uri in value.split(","))


def _records(texts) -> list[str]:
    return [t for t in texts if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t)]


def discover(from_domain: str) -> Check:
    """Section 6.6.3: (record or None, status, domain the record was found at).
    status: "ok", "none" (no usable record), "temperror"."""
    tried = [from_domain]
    org = org_domain(from_domain)
    if org != from_domain:
        tried.append(org)
    for name in tried:
        answer = yield Lookup(f"_dmarc.{name}", "TXT")
        if answer.status == TEMPERROR:
            return None, "temperror", name
        records = _records(answer.values)
        if len(records) > 1:
            return None, "none", name        # several records: no DMARC processing
        if records:
            try:
                return parse_record(records[0]), "ok", name
            except DMARCSyntaxError:
                return None, "none", name
    return None, "none", from_domain


def evaluate(from_domain: str, record: DMARCRecord, record_domain: str, spf_result: str,
             spf_domain: str, dkim_pass_domains: Sequence[str], sample: float) -> DMARCResult:
    """Section 6.6.2 (alignment) and 6.6.4 (policy), `sample` in [0, 1) deciding pct=."""
    policy = record.sp if (record.sp and from_domain != record_domain) else record.p
    spf_ok = spf_result == "pass" and bool(spf_domain) and aligned(spf_domain, from_domain,
                                                                   record.aspf)
    dkim_ok = [d for d in dkim_pass_domains if aligned(d, from_domain, record.adkim)]
    if spf_ok or dkim_ok:
        how = f"aligned DKIM d={dkim_ok[0]}" if dkim_ok else f"aligned SPF {spf_domain}"
        return DMARCResult(PASS, from_domain, policy, "none", how)
    disposition = policy
    if sample * 100 >= record.pct:           # outside the pct= sample: one step milder
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DMARCResult(FAIL, from_domain, policy, disposition,
                       "no aligned SPF or DKIM pass")


def combine(from_domains: Sequence[str], problem: str | None, discovered: Sequence[tuple],
            spf_result: str, spf_domain: str, dkim_pass_domains: Sequence[str],
            sample: float) -> DMARCResult:
    """The verdict from each From: domain's discovery outcome (as `discover` returns them, in
    the same order): every domain evaluated, the strictest outcome wins."""
    if not from_domains:
        return DMARCResult(PERMERROR if problem else NONE, "", reason=problem or "")
    results = []
    for domain, (record, status, where) in zip(from_domains, discovered):
        if status == "temperror":
            results.append(DMARCResult(TEMPERROR_, domain, reason=f"DNS error at _dmarc.{where}"))
        elif record is None:
            results.append(DMARCResult(NONE, domain, reason="no DMARC record"))
        else:
            results.append(evaluate(domain, record, where, spf_result, spf_domain,
                                    dkim_pass_domains, sample))
    return max(results, key=lambda r: (_ORDER[r.disposition], _RESULT_ORDER[r.result]))


def check(from_domains: Sequence[str], problem: str | None, spf_result: str, spf_domain: str,
          dkim_pass_domains: Sequence[str], sample: float) -> Check:
    """Discovery and evaluation in one generator (discovery one domain after the other)."""
    discovered = []
    for domain in from_domains:
        discovered.append((yield from discover(domain)))
    return combine(from_domains, problem, discovered, spf_result, spf_domain,
                   dkim_pass_domains, sample)
