"""tcpserver access rules (ucspi-tcp's tcprules input format), compiled for fast lookup.

Syntax, one rule a line (blank lines and lines starting with # are ignored):

    127.:allow,RELAYCLIENT=""
    192.168.1.10-20:allow,RBLSMTPD=""
    10.2-3.:deny
    10.0.0.0/8:deny                      (CIDR: an extension over tcprules)
    2001:db8::/32:allow,X=/a b/          (IPv6, exact or CIDR; [2001:db8::1]:allow also works)
    :allow                               (the empty address matches every client)

Instructions are `allow` or `deny`, followed by `,NAME=` assignments whose first character after
`=` is the quote character and whose value runs to the next occurrence of it, as tcprules reads
them (`RELAYCLIENT=""`, `X=/a b/`, `Y='x'`). The first matching line in the file wins.

tcprules turns ranges into one cdb key per address; we compile them the same way into dicts,
so a lookup costs a handful of dict probes whatever the number of rules: the client's exact
address, its dotted prefixes ("1.2.3.", "1.2.", "1."), one probe per CIDR length that occurs,
and the empty rule. The lowest line number among the hits wins.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

# tcprules accepts any line length; we bound it so a corrupt file cannot eat memory per line.
MAX_RULE_LINE = 4096
# A range expands to at most 256 keys per octet; two ranges in one rule could mean 65,536.
MAX_RANGE_KEYS = 65536

_EMPTY_ENV: Mapping[str, str] = MappingProxyType({})


class RulesError(Exception):
    """A rules file line that cannot be parsed; str() names file and line."""


@dataclass(frozen=True)
class Decision:
    allow: bool
    env: Mapping[str, str] = field(default_factory=lambda: _EMPTY_ENV)
    line: int = 0            # 0: no rule matched (tcpserver without -x allows)


DEFAULT_ALLOW = Decision(True, _EMPTY_ENV, 0)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OCTET_OR_RANGE = re.compile(r"^(\d{1,3})(?:-(\d{1,3}))?$")
_INSTR = re.compile(r":(allow|deny)(?=,|$)")


def _parse_env(text: str, where: str) -> dict[str, str]:
    env: dict[str, str] = {}
    i = 0
    while i < len(text):
        if text[i] != ",":
            raise RulesError(f"{where}: expected ',' before {text[i:i + 20]!r}")
        i += 1
        eq = text.find("=", i)
        if eq < 0:
            raise RulesError(f"{where}: assignment without '=' in {text[i:i + 40]!r}")
        name = text[i:eq]
        if not _NAME.fullmatch(name):
            raise RulesError(f"{where}: bad variable name {name!r}")
        if eq + 1 >= len(text):
            raise RulesError(f"{where}: {name}= needs a quoted value such as {name}=\"\"")
        quote = text[eq + 1]
        end = text.find(quote, eq + 2)
        if end < 0:
            raise RulesError(f"{where}: unterminated value for {name} (quote {quote!r})")
        value = text[eq + 2:end]
        if "\0" in value:
            raise RulesError(f"{where}: NUL in value of {name}")
        env.setdefault(name, value)   # tcprules keeps the first assignment of a name
        i = end + 1
    return env


def _ipv4_keys(addr: str, where: str) -> list[str] | None:
    """Expand a tcprules IPv4 pattern (exact, prefix `1.2.`, ranges `1.2.3.37-53`, `10.2-3.`)."""
    prefix = addr.endswith(".")
    parts = addr[:-1].split(".") if prefix else addr.split(".")
    if not parts or len(parts) > 4 or (not prefix and len(parts) != 4) or (prefix and len(parts) > 3):
        return None
    choices: list[list[str]] = []
    total = 1
    for p in parts:
        m = _OCTET_OR_RANGE.match(p)
        if not m:
            return None
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > 255 or hi > 255:
            raise RulesError(f"{where}: octet out of range in {addr!r}")
        if hi < lo:
            raise RulesError(f"{where}: empty range {p!r} in {addr!r}")
        choices.append([str(n) for n in range(lo, hi + 1)])
        total *= hi - lo + 1
        if total > MAX_RANGE_KEYS:
            raise RulesError(f"{where}: range {addr!r} expands to too many addresses")
    keys = [""]
    for i, c in enumerate(choices):
        keys = [k + ("." if i else "") + v for k in keys for v in c]
    return [k + "." for k in keys] if prefix else keys


class Rules:
    """Compiled rules. `lookup(ip)` is a pure function of the client address."""

    def __init__(self, source: str = "<rules>") -> None:
        self.source = source
        self.count = 0
        self._exact: dict[str, tuple[int, Decision]] = {}
        self._prefix: dict[str, tuple[int, Decision]] = {}
        # CIDR: prefix length -> {network as int: (line, decision)}, per address family
        self._nets4: dict[int, dict[int, tuple[int, Decision]]] = {}
        self._nets6: dict[int, dict[int, tuple[int, Decision]]] = {}
        self._default: tuple[int, Decision] | None = None

    @staticmethod
    def _put(table: dict, key, entry: tuple[int, Decision]) -> None:
        table.setdefault(key, entry)   # the first line for a key wins

    def add(self, address: str, decision: Decision, where: str) -> None:
        line = decision.line
        entry = (line, decision)
        self.count += 1
        if address == "":
            if self._default is None:
                self._default = entry
            return
        if address.startswith("[") and address.endswith("]"):
            address = address[1:-1]
        if address.startswith("=") or address.startswith("@") or "@" in address:
            raise RulesError(f"{where}: host-name and ident rules ({address!r}) need DNS or "
                             "ident lookups, which mailappliance never does on connect")
        if "/" in address:
            try:
                net = ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise RulesError(f"{where}: bad CIDR network {address!r}") from None
            table = self._nets4 if net.version == 4 else self._nets6
            self._put(table.setdefault(net.prefixlen, {}), int(net.network_address), entry)
            return
        if ":" in address:
            try:
                ip6 = ipaddress.IPv6Address(address)
            except ValueError:
                raise RulesError(f"{where}: bad IPv6 address {address!r}") from None
            mapped = ip6.ipv4_mapped
            self._put(self._exact, str(mapped) if mapped else str(ip6), entry)
            return
        keys = _ipv4_keys(address, where)
        if keys is None:
            raise RulesError(f"{where}: cannot parse address {address!r}")
        table = self._prefix if address.endswith(".") else self._exact
        for k in keys:
            self._put(table, k, entry)

    def lookup(self, ip: str) -> Decision:
        """The decision for a client address (IPv4 or IPv6 text)."""
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return self._default[1] if self._default else DEFAULT_ALLOW
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        text = str(addr)
        best = self._exact.get(text)
        if addr.version == 4:
            octets = text.split(".")
            for n in (3, 2, 1):
                hit = self._prefix.get(".".join(octets[:n]) + ".")
                if hit is not None and (best is None or hit[0] < best[0]):
                    best = hit
            nets, bits = self._nets4, 32
        else:
            nets, bits = self._nets6, 128
        if nets:
            value = int(addr)
            for plen, table in nets.items():
                mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
                hit = table.get(value & mask)
                if hit is not None and (best is None or hit[0] < best[0]):
                    best = hit
        if self._default is not None and (best is None or self._default[0] < best[0]):
            best = self._default
        return best[1] if best is not None else DEFAULT_ALLOW


def parse_rules(text: str, source: str = "<rules>") -> Rules:
    rules = Rules(source)
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source}: line {number}"
        if len(raw) > MAX_RULE_LINE:
            raise RulesError(f"{where}: line longer than {MAX_RULE_LINE} characters")
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = None
        for m in _INSTR.finditer(line):
            break   # the first ':allow'/':deny' after the address
        if m is None:
            raise RulesError(f"{where}: expected ADDRESS:allow or ADDRESS:deny, got {raw!r}")
        address = line[:m.start()].strip()
        env = _parse_env(line[m.end():], where)
        decision = Decision(m.group(1) == "allow", MappingProxyType(env) if env else _EMPTY_ENV,
                            number)
        rules.add(address, decision, where)
    return rules
