"""A cheap DNSBL responder for dnsbl_bench: every A/TXT query under its zones is NXDOMAIN.

    python benchmarks/dnsbl_responder.py --zones bl1.bench,bl2.bench [--delay 0.05]

The test DNS server (mailappliance.testing.dnsserver, twisted.names) costs about 120 us of CPU
per query; at 900 conn/s with two lists that is a fifth of a core taken from the two this
machine has, by a process that stands for a remote DNSBL and is no part of the server's cost.
This one answers the only shape the benchmark asks (NXDOMAIN with the zone's SOA, minimum 0 so
nothing is cached) with a hand-built reply, one UDP socket and one timer heap: a tenth of that.
Queries outside its zones get REFUSED. It prints one JSON line {"host", "port"} when listening
and reads `count`, `reset` and `quit` on stdin (one JSON line back each); end of stdin stops it.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import selectors
import socket
import struct
import sys
import time

# RFC 1035 4.1.1: QR, AA, RD (copied), RA; rcodes.
_QR_AA_RA = 0x8400 | 0x0080
_RD = 0x0100
NXDOMAIN, REFUSED = 3, 5
# Datagrams read per wake-up before the timers get a turn (bounds one loop iteration).
MAX_READS = 64
MAX_DATAGRAM = 4096


def wire_name(name: str) -> bytes:
    return b"".join(bytes((len(p),)) + p.encode() for p in name.split(".") if p) + b"\x00"


def reply(query: bytes, zones: list[bytes]) -> bytes | None:
    """NXDOMAIN with the zone's SOA (TTL 0, minimum 0), REFUSED outside the zones, None for
    anything that is not a one-question query."""
    if len(query) < 17:
        return None
    qid, flags, qd = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qd != 1:
        return None
    end = 12
    while end < len(query) and query[end]:
        if query[end] & 0xC0:
            return None
        end += 1 + query[end]
    end += 5                                    # root label, QTYPE, QCLASS
    if end > len(query):
        return None
    qname = query[12:end - 4].lower()
    question = query[12:end]
    has_opt = len(query) > end                  # an OPT record follows: echo one
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0) if has_opt else b""
    for zone in zones:
        if qname.endswith(zone):
            start = len(qname) - len(zone)
            if start and not _label_boundary(qname, start):
                continue
            soa = (struct.pack("!H", 0xC000 | (12 + start)) + struct.pack("!HHI", 6, 1, 0)
                   + struct.pack("!H", len(_SOA_RDATA)) + _SOA_RDATA)
            head = struct.pack("!HHHHHH", qid, _QR_AA_RA | (flags & _RD) | NXDOMAIN,
                               1, 0, 1, 1 if has_opt else 0)
            return head + question + soa + opt
    head = struct.pack("!HHHHHH", qid, 0x8000 | (flags & _RD) | REFUSED, 1, 0, 0,
                       1 if has_opt else 0)
    return head + question + opt


def _label_boundary(name: bytes, offset: int) -> bool:
    pos = 0
    while pos < offset:
        pos += 1 + name[pos]
    return pos == offset


# MNAME ns.invalid, RNAME hostmaster.invalid, serial 1, refresh/retry/expire, minimum 0.
_SOA_RDATA = (wire_name("ns.invalid") + wire_name("hostmaster.invalid")
              + struct.pack("!IIIII", 1, 3600, 600, 86400, 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zones", required=True, help="comma-separated zone names")
    p.add_argument("--delay", type=float, default=0.0, help="answer delay, seconds")
    args = p.parse_args(argv)
    zones = [wire_name(z.strip().lower()) for z in args.zones.split(",") if z.strip()]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "dns")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
    host, port = sock.getsockname()
    print(json.dumps({"host": host, "port": port}), flush=True)
    pending: list[tuple[float, int, bytes, tuple]] = []
    count = seq = 0
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        for key, _ in sel.select(timeout):
            if key.data == "control":
                line = os.read(key.fd, 4096).decode()
                if not line:
                    return 0
                for cmd in line.split():
                    if cmd == "quit":
                        return 0
                    if cmd == "reset":
                        count = 0
                    print(json.dumps({"count": count}), flush=True)
                continue
            for _ in range(MAX_READS):
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                count += 1
                out = reply(data, zones)
                if out is not None:
                    seq += 1
                    heapq.heappush(pending, (time.monotonic() + args.delay, seq, out, addr))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, out, addr = heapq.heappop(pending)
            try:
                sock.sendto(out, addr)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
