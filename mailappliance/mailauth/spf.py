"""SPF (RFC 7208): the check_host() function as a pure core.

`check(ip, mail_from, helo)` is a generator (see lookup.py): it yields the DNS questions it
needs and returns an `SPFResult`. Every limit of RFC 7208 section 4.6.4 is here, named:
10 terms that cause DNS queries (include, a, mx, ptr, exists, redirect) for the whole
evaluation, includes and redirects together; 2 void lookups; 10 MX hosts per mx; 10 PTR names
per ptr. An include loop therefore ends at the 11th lookup as permerror. Any syntax error in a
record is permerror before anything in it is evaluated (section 4.6).

Deliberate simplifications (documented in docs/MAILAUTH.md):
- the %{p} macro expands to "unknown" without a lookup (section 7.3 allows "unknown" when no
  validated name is found; the RFC itself discourages %{p});
- exp= is parsed and checked but its explanation is not fetched: our 550 carries our own text.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from mailappliance.mailauth.lookup import NXDOMAIN, OK, TEMPERROR, Check, DNSResult, Lookup

NONE, NEUTRAL, PASS, FAIL, SOFTFAIL = "none", "neutral", "pass", "fail", "softfail"
TEMPERROR_, PERMERROR = "temperror", "permerror"
RESULTS = (NONE, NEUTRAL, PASS, FAIL, SOFTFAIL, TEMPERROR_, PERMERROR)
QUALIFIERS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}

# RFC 7208 section 4.6.4.
MAX_DNS_MECHANISMS = 10
MAX_VOID_LOOKUPS = 2
MAX_MX_NAMES = 10
MAX_PTR_NAMES = 10
# Not in the RFC: a record longer than this is refused as permerror. Section 3.4 asks records
# to fit a 512-octet UDP answer; the largest published ones are under 1 KB. 4 KB is generous
# and bounds the parsing work a hostile domain can cause.
MAX_RECORD_LENGTH = 4096
# Section 7.3: an expanded name longer than 253 octets loses labels on the left.
MAX_NAME = 253
# Parts kept by a macro's digit transformer (section 7.3 allows up to 128 labels anyway).
MAX_TRANSFORMER = 128


class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


@dataclass(frozen=True)
class SPFResult:
    result: str               # one of RESULTS
    identity: str             # "mailfrom" or "helo" (RFC 8601 smtp.mailfrom / smtp.helo)
    domain: str               # the domain whose policy was checked ("" if none could be)
    sender: str               # the <sender> of check_host: local@domain
    reason: str = ""          # one line for the Authentication-Results comment and the log
    lookups: int = 0          # DNS-mechanism terms evaluated


# --- record syntax ------------------------------------------------------------------------------

_MECHANISM = re.compile(r"([+\-~?]?)(all|include|a|mx|ptr|ip4|ip6|exists)(?=$|[:/])", re.I)
_MODIFIER = re.compile(r"([a-z][a-z0-9_.\-]*)=(.*)", re.I | re.S)
_CIDR = re.compile(r"(.*?)(?:/(0|[1-9][0-9]?))?(?://(0|[1-9][0-9]{0,2}))?", re.S)
_MACRO = re.compile(r"%(?:\{([slodiphcrtvSLODIPHCRTV])([0-9]*)(r?)([.\-+,/_=]*)\}|(%)|(_)|(-))",
                    re.I)
_LITERAL = re.compile(r"[\x21-\x24\x26-\x7e]")
_TOPLABEL = re.compile(r"(?=.*[a-z])[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", re.I)
EXP_ONLY = "crt"


@dataclass(frozen=True)
class Term:
    kind: str                 # mechanism name, or "redirect"/"exp"/"unknown" for modifiers
    qualifier: str = "+"
    spec: str | None = None   # domain-spec / macro-string / network text
    cidr4: int | None = None
    cidr6: int | None = None
    text: str = ""            # the term as written, for reasons


def _check_macro_string(text: str, *, exp: bool = False) -> None:
    pos = 0
    while pos < len(text):
        if text[pos] == "%":
            m = _MACRO.match(text, pos)
            if m is None:
                raise _PermError(f"bad macro in {text!r}")
            letter = m.group(1)
            if letter and letter.lower() in EXP_ONLY and not exp:
                raise _PermError(f"macro %{{{letter}}} is only allowed in exp=")
            if m.group(2) and int(m.group(2)) == 0:
                raise _PermError(f"macro transformer 0 in {text!r}")
            pos = m.end()
        elif _LITERAL.match(text, pos) or (exp and text[pos] == " "):
            pos += 1
        else:
            raise _PermError(f"bad character in {text!r}")


def _check_domain_spec(spec: str) -> None:
    """RFC 7208 section 7.1: macro-string domain-end; domain-end is "." toplabel ["."] or a
    macro-expand."""
    if not spec:
        raise _PermError("empty domain-spec")
    _check_macro_string(spec)
    body = spec[:-1] if spec.endswith(".") else spec
    if body.endswith("}") or body.endswith(("%%", "%_", "%-")):
        return      # a macro at the end (a final dot after it is accepted, as pyspf does)
    if "." not in body:
        raise _PermError(f"{spec!r} is not a domain name")
    top = body.rsplit(".", 1)[1]
    if not _TOPLABEL.fullmatch(top):
        raise _PermError(f"{spec!r} does not end in a top-level label")


def parse_record(record: str) -> list[Term]:
    """The terms of a "v=spf1" record; _PermError on any syntax error (section 4.6)."""
    if len(record) > MAX_RECORD_LENGTH:
        raise _PermError(f"record of {len(record)} octets (limit {MAX_RECORD_LENGTH})")
    words = record.split(" ")
    if words[0].lower() != "v=spf1":
        raise _PermError("not an SPF record")
    terms: list[Term] = []
    seen_modifiers: set[str] = set()
    for word in words[1:]:
        if not word:
            continue
        m = _MECHANISM.match(word)
        if m is not None:
            terms.append(_parse_mechanism(m.group(1) or "+", m.group(2).lower(),
                                          word[m.end():], word))
            continue
        m = _MODIFIER.fullmatch(word)
        if m is None:
            raise _PermError(f"unknown term {word!r}")
        name, value = m.group(1).lower(), m.group(2)
        if name in ("redirect", "exp"):
            if name in seen_modifiers:
                raise _PermError(f"{name}= given twice")
            seen_modifiers.add(name)
            _check_domain_spec(value)
            terms.append(Term(name, spec=value, text=word))
        else:
            _check_macro_string(value)
            terms.append(Term("unknown", spec=value, text=word))
    return terms


# Parsed records by their text: a busy sender domain's record (and its includes') is parsed
# once, not at every MAIL FROM. Bounded by entries; when full the cache starts afresh. A
# record that is a syntax error is not kept (it raises each time, which is rare and cheap).
PARSED_RECORDS = 1024
_parsed: dict[str, tuple[Term, ...]] = {}


def parsed_record(record: str) -> tuple[Term, ...]:
    """parse_record(), remembered (Terms are immutable)."""
    terms = _parsed.get(record)
    if terms is None:
        terms = tuple(parse_record(record))
        if len(_parsed) >= PARSED_RECORDS:
            _parsed.clear()
        _parsed[record] = terms
    return terms


def _parse_mechanism(qualifier: str, name: str, rest: str, word: str) -> Term:
    if name == "all":
        if rest:
            raise _PermError(f"bad term {word!r}")
        return Term(name, qualifier, text=word)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs a domain: {word!r}")
        _check_domain_spec(rest[1:])
        return Term(name, qualifier, rest[1:], text=word)
    if name == "ptr":
        spec = None
        if rest:
            if not rest.startswith(":"):
                raise _PermError(f"bad term {word!r}")
            spec = rest[1:]
            _check_domain_spec(spec)
        return Term(name, qualifier, spec, text=word)
    if name in ("a", "mx"):
        m = _CIDR.fullmatch(rest)
        spec_text, c4, c6 = m.group(1), m.group(2), m.group(3)
        spec = None
        if spec_text:
            if not spec_text.startswith(":"):
                raise _PermError(f"bad term {word!r}")
            spec = spec_text[1:]
            _check_domain_spec(spec)
        cidr4 = int(c4) if c4 is not None else None
        cidr6 = int(c6) if c6 is not None else None
        if (cidr4 is not None and cidr4 > 32) or (cidr6 is not None and cidr6 > 128):
            raise _PermError(f"bad prefix length in {word!r}")
        return Term(name, qualifier, spec, cidr4, cidr6, text=word)
    # ip4 / ip6
    if not rest.startswith(":"):
        raise _PermError(f"{name} needs a network: {word!r}")
    network_text, slash, length = rest[1:].partition("/")
    bits = 32 if name == "ip4" else 128
    try:
        address = ipaddress.IPv4Address(network_text) if name == "ip4" else \
            ipaddress.IPv6Address(network_text)
        if slash and (not length.isdigit() or (length != "0" and length.startswith("0"))
                      or int(length) > bits):
            raise ValueError(length)
        prefix = int(length) if slash else bits
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    except ValueError:
        raise _PermError(f"bad network in {word!r}") from None
    return Term(name, qualifier, str(network), text=word)


# --- macros -------------------------------------------------------------------------------------

def _ip_macro(ip) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))


class _Context:
    def __init__(self, ip, sender: str, helo: str) -> None:
        self.ip = ip
        self.sender = sender
        self.local, _, self.sender_domain = sender.rpartition("@")
        self.helo = helo
        self.lookups = 0
        self.voids = 0
        self.matched = ""          # the term that decided, for the reason text

    def expand(self, text: str, domain: str) -> str:
        out = []
        pos = 0
        while pos < len(text):
            if text[pos] != "%":
                out.append(text[pos])
                pos += 1
                continue
            m = _MACRO.match(text, pos)
            pos = m.end()
            if m.group(5):
                out.append("%")
                continue
            if m.group(6):
                out.append(" ")
                continue
            if m.group(7):
                out.append("%20")
                continue
            letter, digits, reverse, delimiters = m.group(1), m.group(2), m.group(3), m.group(4)
            value = self._letter(letter.lower(), domain)
            parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
            if reverse:
                parts.reverse()
            if digits:
                keep = min(int(digits), MAX_TRANSFORMER)
                parts = parts[-keep:]
            value = ".".join(parts)
            if letter.isupper():
                value = urllib.parse.quote(value, safe="-._~")
            out.append(value)
        return "".join(out)

    def _letter(self, letter: str, domain: str) -> str:
        return {
            "s": self.sender, "l": self.local, "o": self.sender_domain, "d": domain,
            "i": _ip_macro(self.ip), "p": "unknown",
            "v": "in-addr" if self.ip.version == 4 else "ip6", "h": self.helo,
            "c": str(self.ip), "r": "unknown", "t": "0",
        }[letter]

    def target(self, spec: str | None, domain: str) -> str | None:
        """The expanded domain-spec as a query name, or None if it cannot be one."""
        if spec is None:
            return domain
        name = self.expand(spec, domain).rstrip(".").lower()
        while len(name) > MAX_NAME and "." in name:
            name = name.split(".", 1)[1]
        return name if valid_name(name) else None

    def count_lookup(self, term: Term) -> None:
        self.lookups += 1
        if self.lookups > MAX_DNS_MECHANISMS:
            raise _PermError(f"more than {MAX_DNS_MECHANISMS} DNS lookups ({term.text})")

    def void(self, term: Term, result: DNSResult) -> None:
        if result.void:
            self.voids += 1
            if self.voids > MAX_VOID_LOOKUPS:
                raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups ({term.text})")


def valid_name(name: str) -> bool:
    """A name DNS can carry with at least two labels (section 4.3's "multi-label")."""
    if not name or len(name) > MAX_NAME:
        return False
    labels = name.split(".")
    return len(labels) >= 2 and all(0 < len(label) <= 63 for label in labels) \
        and all(" " not in label for label in labels)


# --- evaluation ---------------------------------------------------------------------------------

def _query(name: str, rdtype: str) -> Check:
    result = yield Lookup(name, rdtype)
    return result


def _addresses(ctx: _Context, name: str) -> Check:
    rdtype = "A" if ctx.ip.version == 4 else "AAAA"
    result = yield from _query(name, rdtype)
    return result


def _in(ctx: _Context, addresses, cidr4: int | None, cidr6: int | None) -> bool:
    prefix = (32 if cidr4 is None else cidr4) if ctx.ip.version == 4 else \
        (128 if cidr6 is None else cidr6)
    for text in addresses:
        try:
            net = ipaddress.ip_network(f"{text}/{prefix}", strict=False)
        except ValueError:
            continue
        if net.version == ctx.ip.version and ctx.ip in net:
            return True
    return False


def _check_host(ctx: _Context, domain: str) -> Check:
    """Section 4: the result for <domain>: one of RESULTS (raises _TempError/_PermError)."""
    if not valid_name(domain):
        return NONE
    answer = yield from _query(domain, "TXT")
    if answer.status == TEMPERROR:
        raise _TempError(f"DNS error looking up {domain} TXT: {answer.reason or 'timeout'}")
    if answer.status == NXDOMAIN:
        return NONE
    records = [t for t in answer.values
               if t[:6].lower() == "v=spf1" and (len(t) == 6 or t[6] == " ")]
    if not records:
        return NONE
    if len(records) > 1:
        raise _PermError(f"{domain} has {len(records)} SPF records")
    terms = parsed_record(records[0])
    redirect = None
    for term in terms:
        if term.kind == "redirect":
            redirect = term
            continue
        if term.kind in ("exp", "unknown"):
            continue
        matched = yield from _mechanism(ctx, term, domain)
        if matched:
            ctx.matched = f"{term.text} in {domain}"
            return QUALIFIERS[term.qualifier]
    if redirect is not None:
        ctx.count_lookup(redirect)
        target = ctx.target(redirect.spec, domain)
        if target is None:
            raise _PermError(f"redirect to an unusable name ({redirect.text})")
        result = yield from _check_host(ctx, target)
        if result == NONE:
            raise _PermError(f"redirect to {target}, which has no SPF record")
        return result
    ctx.matched = f"no mechanism matched in {domain}"
    return NEUTRAL


def _mechanism(ctx: _Context, term: Term, domain: str) -> Check:
    kind = term.kind
    if kind == "all":
        return True
    if kind in ("ip4", "ip6"):
        net = _network(term.spec)
        return net.version == ctx.ip.version and ctx.ip in net
    ctx.count_lookup(term)
    target = ctx.target(term.spec, domain)
    if kind == "include":
        if target is None:
            raise _PermError(f"include of an unusable name ({term.text})")
        result = yield from _check_host(ctx, target)
        if result == PASS:
            return True
        if result in (FAIL, SOFTFAIL, NEUTRAL):
            return False
        if result == NONE:
            raise _PermError(f"include:{target} has no SPF record")
        return False          # not reached: errors are raised
    if target is None:
        ctx.voids += 1        # a name that cannot be asked is as void as NXDOMAIN
        if ctx.voids > MAX_VOID_LOOKUPS:
            raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups ({term.text})")
        return False
    if kind == "a":
        result = yield from _addresses(ctx, target)
        _raise_temp(result, target)
        ctx.void(term, result)
        return _in(ctx, result.values, term.cidr4, term.cidr6)
    if kind == "mx":
        result = yield from _query(target, "MX")
        _raise_temp(result, target)
        ctx.void(term, result)
        hosts = _mx_hosts(result.values)
        if len(hosts) > MAX_MX_NAMES:
            raise _PermError(f"{target} has more than {MAX_MX_NAMES} MX records")
        for host in hosts:
            found = yield from _addresses(ctx, host)
            _raise_temp(found, host)
            if _in(ctx, found.values, term.cidr4, term.cidr6):
                return True
        return False
    if kind == "exists":
        result = yield from _query(target, "A")
        _raise_temp(result, target)
        ctx.void(term, result)
        return bool(result.values)
    if kind == "ptr":
        reverse = ctx.ip.reverse_pointer
        result = yield from _query(reverse, "PTR")
        if result.status == TEMPERROR:
            return False      # section 5.5: a DNS error here means no match
        ctx.void(term, result)
        for name in [v for v in result.values if isinstance(v, str)][:MAX_PTR_NAMES]:
            name = name.lower().rstrip(".")
            if not (name == target or name.endswith("." + target)):
                continue
            found = yield from _addresses(ctx, name)
            if found.status == OK and str(ctx.ip) in {str(ipaddress.ip_address(a))
                                                     for a in found.values if _is_ip(a)}:
                return True
        return False
    raise _PermError(f"unknown mechanism {term.text!r}")


@functools.lru_cache(maxsize=PARSED_RECORDS)
def _network(spec: str):
    """An ip4/ip6 term's network (its text was checked by the parser), made once."""
    return ipaddress.ip_network(spec)


def _mx_hosts(values) -> list[str]:
    """The exchange names of an MX answer, lowest preference first, without the null MX
    (RFC 7505). An answer value that is not a (preference, host) pair -- a resolver or fake that
    answers an MX question with another record type -- is no host rather than an exception:
    the evaluation must end in a result word whatever DNS sends."""
    pairs = [v for v in values if isinstance(v, tuple) and len(v) == 2
             and isinstance(v[0], int) and isinstance(v[1], str)]
    return [host for _pref, host in sorted(pairs) if host not in ("", ".")]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _raise_temp(result: DNSResult, name: str) -> None:
    if result.status == TEMPERROR:
        raise _TempError(f"DNS error looking up {name}: {result.reason or 'timeout'}")


def client_address(ip: str):
    """The address to check: an IPv4-mapped IPv6 address counts as IPv4 (section 5)."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_host(ip: str, domain: str, sender: str, helo: str = "") -> Check:
    """check_host(<ip>, <domain>, <sender>) of section 4, as a result word and a reason."""
    ctx = _Context(client_address(ip), sender, helo)
    try:
        result = yield from _check_host(ctx, domain.lower().rstrip("."))
    except _TempError as e:
        return TEMPERROR_, str(e), ctx.lookups
    except _PermError as e:
        return PERMERROR, str(e), ctx.lookups
    if result == NONE:
        return NONE, f"no SPF record for {domain}", ctx.lookups
    return result, ctx.matched, ctx.lookups


def check(ip: str, mail_from: str, helo: str) -> Check:
    """The SMTP server's SPF check: the MAIL FROM identity, or HELO's when the reverse path is
    null (section 2.4: then the sender is postmaster@<helo>). Returns an SPFResult."""
    helo = helo.strip().rstrip(".").lower()
    address = mail_from.strip().strip("<>")
    if address:
        local, at, domain = address.rpartition("@")
        if not at:
            return SPFResult(NONE, "mailfrom", "", address, "sender without a domain")
        sender = f"{local or 'postmaster'}@{domain.lower()}"
        identity = "mailfrom"
    else:
        domain = helo
        sender = f"postmaster@{helo}"
        identity = "helo"
    domain = domain.lower().rstrip(".")
    if not valid_name(domain) or _is_ip(domain.strip("[]")):
        return SPFResult(NONE, identity, domain, sender, f"{domain or 'empty name'} is not a "
                                                         f"domain name")
    result, reason, lookups = yield from check_host(ip, domain, sender, helo)
    return SPFResult(result, identity, domain, sender, reason, lookups)
