"""A real authoritative DNS server on loopback, for tests and benchmarks, built on twisted.names.

It serves zones given as Python data (see mailappliance.testing.zones), over UDP and TCP on the
same port, truncating UDP answers that do not fit (TC bit, so clients retry over TCP). Its
behaviour can be changed while it runs, for every name or per zone suffix:

    mode "answer"   normal answers (the default)
    mode "servfail" SERVFAIL to every query
    mode "refused"  REFUSED to every query
    mode "drop"     never answers (a dead or firewalled server)
    delay SECONDS   answers (of any mode but drop) are sent that much later

It counts every query it receives (name, type, transport), so tests can prove a cache hit.

In-process, in a test's reactor:

    server = DNSTestServer(ZONES, reactor)
    host, port = server.start()
    ... Resolver(reactor, [(host, port)]) ...
    yield server.stop()

As a subprocess (for integration tests against the real twistd server):

    python -m mailappliance.testing.dnsserver --zones-json '{...}' [--delay S] [--mode M]

prints one JSON line {"host": ..., "port": ...} when it is listening, then reads commands on
stdin, one a line, answering one JSON line each: `count [NAME [TYPE]]`, `queries`,
`mode MODE [ZONE]`, `delay SECONDS [ZONE]`, `reset`, `quit`. End of stdin stops it, so it never
outlives its test. `DNSServerProcess` below drives it from blocking test code.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

from twisted.internet import defer, error
from twisted.names import dns, server

from mailappliance.testing.zones import Lookup, Record, ZoneSet, txt_chunks

MODES = ("answer", "servfail", "refused", "drop")
# Binding UDP on a kernel-chosen port and then TCP on the same number can collide with another
# program's TCP port; retry with a new UDP port this many times.
BIND_TRIES = 20
# RFC 1035 section 4.2.1: without EDNS a UDP answer is at most 512 octets.
CLASSIC_UDP_SIZE = 512
# Bounds for the subprocess driver (blocking test code): start-up and one command round trip.
PROCESS_START_TIMEOUT = 20.0
PROCESS_REPLY_TIMEOUT = 10.0
# The query log is bounded so a benchmark cannot grow it without limit; counts stay exact.
MAX_QUERY_LOG = 100000


@dataclass
class Behaviour:
    mode: str = "answer"
    delay: float = 0.0


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


class DNSTestServer:
    """The server: zones + behaviours + a query log, over twisted.names' protocol classes."""

    def __init__(self, zones: Mapping[str, Mapping[str, Any]], reactor=None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.zones = ZoneSet(zones)
        self.host = host
        self.requested_port = port
        self.default = Behaviour()
        self.per_zone: dict[str, Behaviour] = {}
        self.queries: list[tuple[str, str, str]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.total = 0
        self._udp = None
        self._tcp = None
        self._pending: set = set()
        self.factory = _Factory(self)

    # control

    def set_behaviour(self, mode: str | None = None, delay: float | None = None,
                      zone: str | None = None) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if zone is None:
            target = self.default
        else:
            zone = zone.lower().rstrip(".")
            target = self.per_zone.setdefault(zone, Behaviour(self.default.mode,
                                                              self.default.delay))
        if mode is not None:
            target.mode = mode
        if delay is not None:
            target.delay = float(delay)

    def behaviour_for(self, name: str) -> Behaviour:
        best = None
        for suffix, b in self.per_zone.items():
            if _suffix_match(name, suffix) and (best is None or len(suffix) > len(best[0])):
                best = (suffix, b)
        return best[1] if best else self.default

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        if name is None and rdtype is None:
            return self.total
        name = name.lower().rstrip(".") if name else None
        rdtype = rdtype.upper() if rdtype else None
        return sum(n for (qn, qt), n in self.counts.items()
                   if (name is None or qn == name) and (rdtype is None or qt == rdtype))

    def reset(self) -> None:
        self.queries.clear()
        self.counts.clear()
        self.total = 0

    # life cycle

    def start(self) -> tuple[str, int]:
        last: Exception | None = None
        for _ in range(BIND_TRIES if self.requested_port == 0 else 1):
            udp = self.reactor.listenUDP(self.requested_port,
                                         dns.DNSDatagramProtocol(self.factory),
                                         interface=self.host)
            port = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(port, self.factory, interface=self.host)
            except error.CannotListenError as e:
                last = e
                udp.stopListening()
                continue
            self._udp, self._tcp = udp, tcp
            return self.address
        raise RuntimeError(f"cannot bind UDP and TCP on one port: {last}")

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self._udp.getHost().port

    def stop(self):
        for call in list(self._pending):
            if call.active():
                call.cancel()
        self._pending.clear()
        waits = []
        for p in (self._udp, self._tcp):
            if p is not None:
                waits.append(defer.maybeDeferred(p.stopListening))
        for proto in list(self.factory.connections):
            proto.transport.abortConnection()
        self._udp = self._tcp = None
        return defer.gatherResults(waits)

    # the work

    def _record_query(self, name: str, rdtype: str, transport: str) -> None:
        self.total += 1
        key = (name, rdtype)
        self.counts[key] = self.counts.get(key, 0) + 1
        if len(self.queries) < MAX_QUERY_LOG:
            self.queries.append((name, rdtype, transport))

    def handle(self, message, proto, address) -> None:
        if not message.queries:
            return self._send(message, proto, address, dns.EFORMAT, (), (), 0.0)
        q = message.queries[0]
        name = q.name.name.decode("ascii", "replace").lower().rstrip(".")
        rdtype = dns.QUERY_TYPES.get(q.type, str(q.type))
        self._record_query(name, rdtype, "udp" if address is not None else "tcp")
        behaviour = self.behaviour_for(name)
        if behaviour.mode == "drop":
            return None
        if behaviour.mode == "servfail":
            return self._send(message, proto, address, dns.ESERVER, (), (), behaviour.delay)
        if behaviour.mode == "refused":
            return self._send(message, proto, address, dns.EREFUSED, (), (), behaviour.delay)
        result: Lookup = self.zones.lookup(name, rdtype)
        rcode = {"NOERROR": dns.OK, "NXDOMAIN": dns.ENAME, "REFUSED": dns.EREFUSED}[result.rcode]
        answers = [_rrheader(r) for r in result.answer]
        authority = [_rrheader(r) for r in result.authority]
        return self._send(message, proto, address, rcode, answers, authority, behaviour.delay)

    def _send(self, message, proto, address, rcode, answers, authority, delay) -> None:
        response = self.factory._responseFromMessage(
            message=message, rCode=rcode, answers=list(answers), authority=list(authority))
        response.auth = rcode in (dns.OK, dns.ENAME)
        response.recAv = False
        if address is None:
            response.maxSize = 0                     # TCP: never truncated
        else:
            response.maxSize = CLASSIC_UDP_SIZE
            for extra in message.additional:
                if getattr(extra, "type", None) == dns.OPT:
                    response.maxSize = max(CLASSIC_UDP_SIZE, extra.cls)
        if delay <= 0:
            self._write(proto, response, address)
            return
        call = self.reactor.callLater(delay, self._delayed, proto, response, address)
        self._pending.add(call)

    def _delayed(self, proto, response, address) -> None:
        self._pending = {c for c in self._pending if c.active()}
        self._write(proto, response, address)

    def _write(self, proto, response, address) -> None:
        if proto.transport is None:
            return                                    # the TCP client went away meanwhile
        if address is None:
            proto.writeMessage(response)
        else:
            proto.writeMessage(response, address)


def _rrheader(r: Record):
    value = r.value
    if r.rdtype == "A":
        payload = dns.Record_A(value, ttl=r.ttl)
    elif r.rdtype == "AAAA":
        payload = dns.Record_AAAA(value, ttl=r.ttl)
    elif r.rdtype == "MX":
        pref, host = value.split(" ", 1)
        payload = dns.Record_MX(int(pref), b"" if host == "." else host.encode(), ttl=r.ttl)
    elif r.rdtype == "TXT":
        payload = dns.Record_TXT(*txt_chunks(value), ttl=r.ttl)
    elif r.rdtype == "CNAME":
        payload = dns.Record_CNAME(value.encode(), ttl=r.ttl)
    elif r.rdtype == "NS":
        payload = dns.Record_NS(value.encode(), ttl=r.ttl)
    elif r.rdtype == "PTR":
        payload = dns.Record_PTR(value.encode(), ttl=r.ttl)
    elif r.rdtype == "SOA":
        mname, rname, serial, refresh, retry, expire, minimum = value.split()
        payload = dns.Record_SOA(mname.encode(), rname.encode(), int(serial), int(refresh),
                                 int(retry), int(expire), int(minimum), ttl=r.ttl)
    else:
        raise ValueError(r.rdtype)
    return dns.RRHeader(r.owner.encode(), payload.TYPE, dns.IN, r.ttl, payload, auth=True)


class _Factory(server.DNSServerFactory):
    """twisted.names' server factory with our zone lookup in place of its resolver chain."""

    def __init__(self, owner: DNSTestServer) -> None:
        super().__init__(authorities=[], verbose=0)
        self.owner = owner

    def handleQuery(self, message, protocol, address):
        self.owner.handle(message, protocol, address)

    def allowQuery(self, message, protocol, address):
        return True


# --- the subprocess ---------------------------------------------------------------------------

def _command(server: DNSTestServer, line: str, stop) -> dict[str, Any]:
    words = line.split()
    if not words:
        return {"error": "empty command"}
    cmd, args = words[0].lower(), words[1:]
    try:
        if cmd == "count":
            return {"count": server.count(args[0] if args else None,
                                          args[1] if len(args) > 1 else None)}
        if cmd == "queries":
            return {"queries": [list(q) for q in server.queries]}
        if cmd == "mode":
            server.set_behaviour(mode=args[0], zone=args[1] if len(args) > 1 else None)
            return {"ok": True}
        if cmd == "delay":
            server.set_behaviour(delay=float(args[0]), zone=args[1] if len(args) > 1 else None)
            return {"ok": True}
        if cmd == "reset":
            server.reset()
            return {"ok": True}
        if cmd == "quit":
            stop()
            return {"ok": True}
    except (IndexError, ValueError) as e:
        return {"error": str(e)}
    return {"error": f"unknown command {cmd!r}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailappliance.testing.dnsserver")
    parser.add_argument("--zones-json", help="zones as JSON text")
    parser.add_argument("--zones", help="file holding the zones as JSON")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--mode", choices=MODES, default="answer")
    opts = parser.parse_args(argv)
    if opts.zones_json:
        zones = json.loads(opts.zones_json)
    elif opts.zones:
        with open(opts.zones, encoding="utf-8") as f:
            zones = json.load(f)
    else:
        zones = {}

    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    server = DNSTestServer(zones, reactor, opts.host, opts.port)
    server.set_behaviour(mode=opts.mode, delay=opts.delay)

    def stop() -> None:
        if reactor.running:
            reactor.callLater(0, reactor.stop)

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            host, port = server.start()
            self.sendLine(json.dumps({"host": host, "port": port, "pid": os.getpid()}).encode())

        def lineReceived(self, line: bytes) -> None:
            reply = _command(server, line.decode("utf-8", "replace").strip(), stop)
            self.sendLine(json.dumps(reply).encode())

        def connectionLost(self, reason=None) -> None:
            stop()

    stdio.StandardIO(Control())
    reactor.run()
    return 0


class DNSServerProcess:
    """Blocking driver of the subprocess, for integration tests and benchmarks.

        with DNSServerProcess(ZONES, delay=0.05) as dns:
            config = f'[dns]\\nnameservers = ["{dns.host}:{dns.port}"]'
            ...
            assert dns.count("2.0.0.127.bl.test", "A") == 1
    """

    def __init__(self, zones: Mapping[str, Any], *, delay: float = 0.0, mode: str = "answer",
                 host: str = "127.0.0.1") -> None:
        self.zones = zones
        self.delay = delay
        self.mode = mode
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DNSServerProcess":
        cmd = [sys.executable, "-m", "mailappliance.testing.dnsserver",
               "--zones-json", json.dumps(self.zones), "--host", self.host,
               "--delay", str(self.delay), "--mode", self.mode]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        ready = self._read_line(PROCESS_START_TIMEOUT)
        self.host, self.port = ready["host"], ready["port"]
        return self

    @property
    def nameserver(self) -> str:
        """The `[dns] nameservers` entry for this server."""
        return f"{self.host}:{self.port}"

    def _read_line(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("test DNS server did not answer in time")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"test DNS server exited ({self.proc.poll()})")
                buf += chunk
        return json.loads(buf)

    def command(self, line: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._read_line(PROCESS_REPLY_TIMEOUT)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply

    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        args = " ".join(x for x in (name, rdtype) if x)
        return int(self.command(f"count {args}".strip())["count"])

    def queries(self) -> list[tuple[str, str, str]]:
        return [tuple(q) for q in self.command("queries")["queries"]]

    def set_mode(self, mode: str, zone: str | None = None) -> None:
        self.command(f"mode {mode} {zone or ''}".strip())

    def set_delay(self, seconds: float, zone: str | None = None) -> None:
        self.command(f"delay {seconds} {zone or ''}".strip())

    def reset(self) -> None:
        self.command("reset")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()          # end of stdin stops the server
                self.proc.wait(PROCESS_REPLY_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(PROCESS_REPLY_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> "DNSServerProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
