"""DNS zones as plain Python data, for the test DNS server and the FakeResolver.

One format for both, JSON-compatible so it can be handed to the server subprocess:

    ZONES = {
        "bl.test": {                              # zone origin
            "$ttl": 300,                          # optional: default record TTL (300)
            "$minimum": 60,                       # optional: SOA minimum = negative TTL (60)
            "2.0.0.127": [["A", "127.0.0.2"], ["TXT", "listed, see http://bl.test/"]],
        },
        "example.test": {
            "@": [["MX", "10 mx1.example.test"], ["MX", "20 mx2"]],
            "mx1": [["A", "127.0.0.1"], ["AAAA", "::1", 30]],      # optional third item: TTL
            "www": [["CNAME", "mx1.example.test."]],
            "*.wild": [["A", "127.0.0.9"]],      # a wildcard (RFC 4592, simplified)
        },
        "nomail.test": {"@": [["MX", "0 ."]]},  # null MX (RFC 7505)
    }

Owner names are relative to the origin ("@" is the apex); a name ending in "." is absolute.
Values are in zone-file text (MX "pref host", SOA is generated). A target name without a final
dot is taken relative to the origin for names with no dot in them, absolute otherwise.

`ZoneSet.lookup(name, rdtype)` gives what an authoritative server says: NOERROR with records
(following CNAMEs inside our zones), NODATA and NXDOMAIN with the zone's SOA in authority, or
REFUSED for a name outside every zone. Pure: no sockets, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

DEFAULT_TTL = 300
DEFAULT_MINIMUM = 60
# RFC 1034 does not bound CNAME chains; resolvers stop around 8-16 (dnspython: 16).
MAX_CNAME_CHAIN = 8
TYPES = ("A", "AAAA", "MX", "TXT", "CNAME", "NS", "PTR", "SOA")


@dataclass(frozen=True)
class Record:
    owner: str          # absolute, lower case, no trailing dot
    rdtype: str         # "A", "MX", ...
    value: str          # zone-file text: "127.0.0.2", "10 mx.test", the TXT text itself
    ttl: int


@dataclass(frozen=True)
class Zone:
    origin: str
    ttl: int
    minimum: int
    names: Mapping[str, tuple[Record, ...]]

    def soa(self) -> Record:
        return Record(self.origin, "SOA",
                      f"ns.{self.origin} hostmaster.{self.origin} 1 3600 600 86400 "
                      f"{self.minimum}", self.ttl)


@dataclass(frozen=True)
class Lookup:
    rcode: str                                   # NOERROR, NXDOMAIN, REFUSED
    answer: tuple[Record, ...] = ()
    authority: tuple[Record, ...] = ()
    zone: str | None = None


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _absolute(owner: str, origin: str) -> str:
    if owner == "@":
        return origin
    if owner.endswith("."):
        return _norm(owner)
    return f"{_norm(owner)}.{origin}"


def _target(text: str, origin: str) -> str:
    text = text.strip()
    if text in (".", ""):
        return "."
    if text.endswith(".") or "." in text:
        return _norm(text)
    return f"{_norm(text)}.{origin}"


def _record(origin: str, owner: str, item: Any, ttl: int) -> Record:
    if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
        raise ValueError(f"{owner}.{origin}: a record is [TYPE, VALUE] or [TYPE, VALUE, TTL]")
    rdtype, value = str(item[0]).upper(), str(item[1])
    if rdtype not in TYPES or rdtype == "SOA":
        raise ValueError(f"{owner}.{origin}: unsupported type {rdtype}")
    if rdtype in ("CNAME", "NS", "PTR"):
        value = _target(value, origin)
    elif rdtype == "MX":
        pref, _, host = value.partition(" ")
        value = f"{int(pref)} {_target(host, origin)}"
    return Record(_absolute(owner, origin), rdtype, value,
                  int(item[2]) if len(item) == 3 else ttl)


class ZoneSet:
    def __init__(self, data: Mapping[str, Mapping[str, Any]]) -> None:
        self.zones: dict[str, Zone] = {}
        for origin, table in data.items():
            origin = _norm(origin)
            ttl = int(table.get("$ttl", DEFAULT_TTL))
            minimum = int(table.get("$minimum", DEFAULT_MINIMUM))
            names: dict[str, list[Record]] = {}
            for owner, items in table.items():
                if owner.startswith("$"):
                    continue
                for item in items:
                    rec = _record(origin, owner, item, ttl)
                    names.setdefault(rec.owner, []).append(rec)
            self.zones[origin] = Zone(origin, ttl, minimum,
                                      {k: tuple(v) for k, v in names.items()})

    def zone_for(self, name: str) -> Zone | None:
        name = _norm(name)
        labels = name.split(".")
        for i in range(len(labels)):
            zone = self.zones.get(".".join(labels[i:]))
            if zone is not None:
                return zone
        return None

    def _records_at(self, zone: Zone, name: str) -> tuple[Record, ...] | None:
        """The records owned by `name`, with a wildcard match; None if the name does not exist."""
        found = zone.names.get(name)
        if found is not None:
            return found
        # An empty non-terminal (a name with only children) exists, with no records.
        if any(owner.endswith("." + name) for owner in zone.names):
            return ()
        labels = name.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            if parent != zone.origin and not parent.endswith("." + zone.origin):
                break
            wild = zone.names.get("*." + parent)
            if wild is not None:
                return tuple(Record(name, r.rdtype, r.value, r.ttl) for r in wild)
        return None

    def lookup(self, name: str, rdtype: str) -> Lookup:
        rdtype = rdtype.upper()
        name = _norm(name)
        zone = self.zone_for(name)
        if zone is None:
            return Lookup("REFUSED")
        answer: list[Record] = []
        for _ in range(MAX_CNAME_CHAIN):
            if rdtype == "SOA" and name == zone.origin:
                return Lookup("NOERROR", tuple(answer) + (zone.soa(),), (), zone.origin)
            records = self._records_at(zone, name)
            if records is None:
                return Lookup("NXDOMAIN", tuple(answer), (zone.soa(),), zone.origin)
            matching = tuple(r for r in records if r.rdtype == rdtype)
            if matching:
                return Lookup("NOERROR", tuple(answer) + matching, (), zone.origin)
            cname = next((r for r in records if r.rdtype == "CNAME"), None)
            if cname is None or rdtype == "CNAME":
                return Lookup("NOERROR", tuple(answer), (zone.soa(),), zone.origin)
            answer.append(cname)
            name = cname.value
            next_zone = self.zone_for(name)
            if next_zone is None:           # the chain leaves our zones: the client follows it
                return Lookup("NOERROR", tuple(answer), (), zone.origin)
            zone = next_zone
        return Lookup("NOERROR", tuple(answer), (), zone.origin)


def txt_chunks(text: str) -> list[bytes]:
    """A TXT value as character-strings of at most 255 octets (RFC 1035 section 3.3)."""
    raw = text.encode("utf-8")
    return [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
