"""Mail authentication end to end: DKIM signing and SPF/DKIM/DMARC verification, each beside
the same server without them, in alternating runs of one invocation (issue 20).

    PYTHONPATH=. /work/venv/bin/python benchmarks/mailauth_bench.py [--rounds 3]
        [--messages 3000] [--sessions 20] [--size 2048] [--only sign,verify,both]
        [--quiet-wait 30] [--rate R] [--source HEAD] [--scratch /var/tmp]

Every run is a fresh `twistd -n mailappliance` (benchmarks/common.py's OurServer: domain
test.com, user test@test.com, local delivery to its Maildir) listening on 127.0.0.1 and ::1,
with the rules file `::1:allow,RELAYCLIENT=""` / `:allow` and `[dns] nameservers` pointing at
the loopback DNS server the tests use (mailappliance.testing.dnsserver, one process for the
whole invocation, records with a TTL of 300 s). The load is postfix's smtp-source (C, a new
connection per message, no pipelining), in two streams:

- "ours": `smtp-source -6` to [::1], i.e. a RELAYCLIENT client, MAIL FROM a@test.com, smtp-
  source's own message of `--size` bytes (From: a@test.com, a unique Message-Id). This is the
  mail the server signs at injection when test.com has a key; it is delivered locally, and
  signing happens before the commit, so what lands in the Maildir is what would be relayed.
- "internet": `smtp-source -4 -F FILE` to 127.0.0.1, MAIL FROM bench@sender.example, a message
  of `--size` bytes signed beforehand (RSA-2048, relaxed/relaxed) by sender.example, whose SPF
  (ip4:127.0.0.1 ~all), DKIM key and DMARC (p=reject) records the DNS server publishes. With
  verification on the server does SPF at MAIL FROM, then the RSA verification of the signature
  and DMARC after the dot, and adds Authentication-Results; every message passes.

Scenarios, each as `--rounds` rounds whose sides run back to back, taking turns at going first:

- sign:   "ours" stream at `--sessions`; off (no key) / rsa (an RSA-2048 key for test.com) /
          ed25519 (an Ed25519 key). [verify] is the same on every side.
- verify: "internet" stream at `--sessions`; off ([verify] spf/dkim/dmarc "off") / on (the
          defaults: spf tag, dkim tag, dmarc enforce).
- both:   both streams at once, half the sessions each; off (no key, [verify] off) / on (an
          RSA key and [verify] defaults). Half the messages are signed, half verified.

A run counts from the start of smtp-source until every message is on disk (end to end); rate =
messages found / that time. Every message is checked on disk: the "ours" messages by their
Message-Id (and, when signing, that each carries exactly one DKIM-Signature, which dkimpy
verifies against the published key), the "internet" messages by count (they are identical
copies of one file) and, when verifying, that each carries our Authentication-Results with
dkim=pass and dmarc=pass. CPU per message is the server's whole process tree (utime+stime);
"others" is the rest of the machine (whole-machine busy time minus the server, smtp-source
and the DNS server), % of one core. The verdict compares the on/off msg/s ratio per round
(median and range) with issue 20's target: signing and verification together cost at most
25 % of msg/s at 20 sessions, 2 KiB.

With `--rate R` the load is an open loop instead: an asyncio client (in this process) starts
message i at i/R seconds, at most `--sessions` at once, the streams taking turns, with the same
messages (the "ours" ones shaped like smtp-source's). Both sides then run at the same pace,
so CPU per message compares the work done, not the batching a busier or idler server gets
(a server slowed by extra work also commits smaller groups, which costs CPU of its own).

Results go to benchmarks/results/<time>-mailauth_bench.{txt,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (DEFAULT_SCRATCH, RCPT, SENDER, SMTP_SOURCE,  # noqa: E402
                               HeaderCache, Meter, OurServer, cpu_seconds, machine_info,
                               paced, prepare_source, settle, system_busy_seconds, table,
                               wait_quiet, write_results)

SESSIONS = 20
MESSAGES = 3000
SIZE = 2048
ROUNDS = 3
# smtp-source gives up on a run after this long: 3,000 messages at even 50 msg/s fit.
RUN_TIMEOUT = 600.0
# The outside sender of the "internet" stream and its records.
OUTSIDE = "sender.example"
OUTSIDE_SENDER = f"bench@{OUTSIDE}"
OUTSIDE_SELECTOR = "s2048"
INTERNET_MARK = b"X-Bench-Stream: internet"
# What our verifier writes for a message that passed (results.py).
PASS_MARKS = (b"dkim=pass header.d=sender.example", b"dmarc=pass")
# Bytes read from each delivered file to check its header (our Received: and
# Authentication-Results: fields and the signature come first; well under this).
HEAD_BYTES = 16384
VERIFY_ON = '[verify]\nspf = "tag"\ndkim = "tag"\ndmarc = "enforce"\n'
VERIFY_OFF = '[verify]\nspf = "off"\ndkim = "off"\ndmarc = "off"\n'

# scenario -> sides: (name, key algorithm or None, [verify] text, streams)
SCENARIOS = {
    "sign": [("off", None, VERIFY_OFF, ("ours",)),
             ("rsa", "rsa", VERIFY_OFF, ("ours",)),
             ("ed25519", "ed25519", VERIFY_OFF, ("ours",))],
    "verify": [("off", None, VERIFY_OFF, ("internet",)),
               ("on", None, VERIFY_ON, ("internet",))],
    "both": [("off", None, VERIFY_OFF, ("ours", "internet")),
             ("on", "rsa", VERIFY_ON, ("ours", "internet"))],
}


# --- the outside world: DNS records and a signed message ----------------------------------------

def outside_world(workdir: Path, size: int):
    """(zones, the signed message file, the sender's key record): sender.example's key signs
    one message of `size` bytes once, before any run."""
    from mailappliance.mailauth import keys
    from mailappliance.mailauth.keys import KeyRegistry
    from mailappliance.mailauth.sign import sign_with_registry
    keydir = workdir / "outside-keys"
    keydir.mkdir()
    key = keys.generate(keydir, OUTSIDE, OUTSIDE_SELECTOR, "rsa")
    head = (f"From: Bench <{OUTSIDE_SENDER}>\nTo: {RCPT}\nSubject: verification load\n"
            f"Date: Mon, 7 Dec 2026 12:00:00 +0000\nMessage-ID: <bench@{OUTSIDE}>\n"
            f"MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n"
            f"{INTERNET_MARK.decode()}\n\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\n"
    body = b""
    while len(head) + len(body) + len(line) <= size - 520:     # room for the signature field
        body += line
    message = head + body
    fields = sign_with_registry(KeyRegistry(keydir), message, OUTSIDE_SENDER, int(time.time()))
    assert fields.startswith(b"DKIM-Signature:"), fields
    path = workdir / "internet.eml"
    path.write_bytes(fields + message)
    zones = {
        OUTSIDE: {"@": [["TXT", "v=spf1 ip4:127.0.0.1 ~all"]],
                  f"{OUTSIDE_SELECTOR}._domainkey": [["TXT", key.txt_record()]],
                  "_dmarc": [["TXT", "v=DMARC1; p=reject"]]},
        # our own domain: what a receiver of our signed mail would look up; the warm-up
        # message of OurServer.start comes from 127.0.0.1 with a@test.com
        "test.com": {"@": [["TXT", "v=spf1 ip4:127.0.0.1 ip6:::1 -all"]],
                     "_dmarc": [["TXT", "v=DMARC1; p=none"]]},
    }
    return zones, path, len(fields + message)


# --- one server, one run ------------------------------------------------------------------------

class AuthServer(OurServer):
    def __init__(self, root: Path, nameserver: str, rules: Path, verify: str,
                 key: str | None, env: dict | None) -> None:
        super().__init__(root, env=env)
        self.key_algorithm = key
        self.proc.config_text += (
            f'rules = "{rules}"\n'                       # continues OurServer's [smtp] table
            f'[dns]\nnameservers = ["{nameserver}"]\n'
            f'{verify}'
            '[listen]\nsmtp = ["tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\\\:\\\\:1"]\n'
            'submission = []\npop3 = []\n')

    def start(self) -> "AuthServer":
        self.data.mkdir(parents=True, exist_ok=True)
        self.key = None
        if self.key_algorithm:
            from mailappliance.mailauth import keys
            self.key = keys.generate(self.data, "test.com", "mail", self.key_algorithm)
        super().start()
        ports = self.proc.ports.get("smtp") or []
        if len(ports) < 2:
            self.stop()
            raise RuntimeError(f"expected SMTP on 127.0.0.1 and ::1, ready.json: {ports}")
        return self


def smtp_source(stream: str, port4: int, port6: int, sessions: int, messages: int, size: int,
                eml: Path) -> subprocess.Popen:
    if stream == "ours":
        cmd = [SMTP_SOURCE, "-6", "-M", "localhost", "-s", str(sessions), "-m", str(messages),
               "-l", str(size), "-f", SENDER, "-t", RCPT, f"[::1]:{port6}"]
    else:
        cmd = [SMTP_SOURCE, "-4", "-M", "localhost", "-s", str(sessions), "-m", str(messages),
               "-F", str(eml), "-f", OUTSIDE_SENDER, "-t", RCPT, f"127.0.0.1:{port4}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# --- the open loop (--rate) -----------------------------------------------------------------------

# One message's conversation must end within this; a hang is an error, not a stall.
MESSAGE_TIMEOUT = 60.0


def ours_message(i: int, size: int) -> bytes:
    """Like smtp-source's own message: From: a@test.com, a unique Message-Id, filler lines."""
    head = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nDate: Mon, 7 Dec 2026 12:00:00 +0000\r\n"
            f"Message-Id: <rate.{i}@bench.test>\r\n\r\n").encode()
    line = b"La de da de da %d.\r\n"
    body = b""
    n = 1
    while len(head) + len(body) < size:
        body += line % n
        n += 1
    return head + body


async def _send(host: str, port: int, sender: str, message: bytes) -> None:
    from benchmarks.e2e_bench import smtp_send
    await smtp_send(host, port, sender, RCPT, message)


async def open_loop(streams, port4: int, port6: int, count: int, sessions: int, size: int,
                    eml: bytes, rate: float) -> list[str]:
    """Message i starts at t0 + i/rate (streams taking turns), at most `sessions` at once: the
    same pace on both sides, so CPU per message compares the work, not the batching a busier
    or idler server gets."""
    errors: list[str] = []
    internet = eml.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    async def one(i: int) -> None:
        try:
            if streams[i % len(streams)] == "ours":
                job = _send("::1", port6, SENDER, ours_message(i, size))
            else:
                job = _send("127.0.0.1", port4, OUTSIDE_SENDER, internet)
            await asyncio.wait_for(job, MESSAGE_TIMEOUT)
        except Exception as e:          # noqa: BLE001 - every failure is counted, none stops the run
            errors.append(f"{type(e).__name__}: {e}")

    await paced(count, rate, sessions, one)
    return errors


def header_of(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except FileNotFoundError:
        return b""
    end = head.find(b"\n\n")
    return head if end < 0 else head[:end + 1]


def check_disk(server: AuthServer, streams, per_stream: int, verifying: bool) -> dict:
    """What is on disk, message by message (see the module's docstring)."""
    import dkim
    files = [p for p in server.message_files()]
    record = server.key.txt_record().encode() if server.key else None
    ids = HeaderCache("message-id")
    ours_ids = set()
    internet = internet_passed = signed_ok = signature_problems = 0
    for path in files:
        head = header_of(path)
        if INTERNET_MARK in head:
            internet += 1
            if verifying and all(m in head for m in PASS_MARKS):
                internet_passed += 1
            continue
        mid = ids.get(path)
        if mid is None or b"warm-up" in mid:
            continue
        ours_ids.add(mid)
        if record is not None:
            if head.count(b"DKIM-Signature:") != 1:
                signature_problems += 1
                continue
            with open(path, "rb") as f:
                whole = f.read()
            if dkim.verify(whole.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),
                           dnsfunc=lambda name, timeout=5: record):
                signed_ok += 1
            else:
                signature_problems += 1
    found = (len(ours_ids) if "ours" in streams else 0) + \
        (min(internet, per_stream) if "internet" in streams else 0)
    return {"found": found, "ours": len(ours_ids), "internet": internet,
            "internet_passed": internet_passed, "signed_ok": signed_ok,
            "signature_problems": signature_problems}


def one_run(scenario: str, side, rnd: int, root: Path, world: dict, args) -> dict:
    name, key, verify, streams = side
    shutil.rmtree(root, ignore_errors=True)
    server = AuthServer(root, world["nameserver"], world["rules"], verify, key, world["env"])
    server.start()
    per_stream = args.messages // len(streams)
    sessions = max(1, args.sessions // len(streams))
    dns = world["dns"]
    try:
        settle(server)
        dns_q0 = dns.count()
        dns_cpu0 = cpu_seconds([dns.proc.pid])
        busy0 = system_busy_seconds()
        r0 = os.times()
        with Meter(server.pid, tree=True) as meter:
            t0 = time.monotonic()
            procs = [] if args.rate else \
                [smtp_source(s, server.proc.ports["smtp"][0], server.proc.ports["smtp"][1],
                             sessions, per_stream, args.size, world["eml"]) for s in streams]
            errors = []
            if args.rate:
                errors += asyncio.run(open_loop(
                    streams, server.proc.ports["smtp"][0], server.proc.ports["smtp"][1],
                    per_stream * len(streams), args.sessions, args.size,
                    world["eml"].read_bytes(), args.rate))[:5]
            for p in procs:
                try:
                    _out, err = p.communicate(timeout=RUN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    p.kill()
                    _out, err = p.communicate()
                    errors.append("smtp-source timed out")
                if p.returncode:
                    errors.append(f"smtp-source exit {p.returncode}: {err.strip()[-300:]}")
            settle(server, per_stream * len(streams) + 1)
            wall = time.monotonic() - t0
        r1 = os.times()
        busy = system_busy_seconds() - busy0
        client_cpu = (r1.children_user - r0.children_user) + \
            (r1.children_system - r0.children_system) + \
            ((r1.user - r0.user) + (r1.system - r0.system) if args.rate else 0.0)
        dns_cpu = cpu_seconds([dns.proc.pid]) - dns_cpu0
        dns_queries = dns.count() - dns_q0
        disk = check_disk(server, streams, per_stream, verify == VERIFY_ON)
    finally:
        server.stop()
    sent = per_stream * len(streams)
    found = disk["found"]
    problems = list(errors)
    if found < sent:
        problems.append(f"only {found}/{sent} messages found on disk")
    if key and disk["signed_ok"] != disk["ours"]:
        problems.append(f"{disk['signature_problems']} of {disk['ours']} signed messages "
                        "without one valid signature")
    if verify == VERIFY_ON and "internet" in streams and disk["internet_passed"] != disk["internet"]:
        problems.append(f"{disk['internet'] - disk['internet_passed']} verified messages "
                        "without dkim=pass and dmarc=pass")
    return {"scenario": scenario, "side": name, "round": rnd, "sent": sent, "found": found,
            "rate": found / wall, "wall": wall, "cpu_ms": 1000 * meter.cpu / max(found, 1),
            "server_cpu_pct": 100 * meter.cpu / wall,
            "others_pct": max(0.0, busy - meter.cpu - client_cpu - dns_cpu) / wall * 100,
            "dns_queries": dns_queries, "disk": disk, "problems": problems}


# --- the report -----------------------------------------------------------------------------------

def summary(runs: list[dict], scenario: str, sides, open_loop: bool = False) -> list[str]:
    rs = [r for r in runs if r["scenario"] == scenario]
    if not rs:
        return []
    base = sides[0][0]
    rows = []
    for name, *_ in sides:
        mine = [r for r in rs if r["side"] == name]
        rows.append([name, f"{statistics.median(r['rate'] for r in mine):.1f}",
                     ", ".join(f"{r['rate']:.0f}" for r in mine),
                     f"{statistics.median(r['cpu_ms'] for r in mine):.2f}",
                     ", ".join(f"{r['cpu_ms']:.2f}" for r in mine),
                     "/".join(f"{r['others_pct']:.0f}" for r in mine),
                     ", ".join(f"{r['found']}/{r['sent']}" for r in mine)])
    lines = ["", f"{scenario}:",
             table(["side", "msg/s median", "msg/s per round", "CPU ms/msg median",
                    "CPU ms/msg per round", "others %", "on disk"], rows)]
    for name, *_ in sides[1:]:
        ratios, cpu_add = [], []
        for rnd in sorted({r["round"] for r in rs}):
            a = [r for r in rs if r["round"] == rnd and r["side"] == base]
            b = [r for r in rs if r["round"] == rnd and r["side"] == name]
            if a and b:
                ratios.append(b[0]["rate"] / a[0]["rate"])
                cpu_add.append(b[0]["cpu_ms"] - a[0]["cpu_ms"])
        if ratios:
            line = (f"{name}/{base} msg/s: median {statistics.median(ratios):.2f}x (range "
                    f"{min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds); CPU per "
                    f"message {statistics.median(cpu_add):+.2f} ms (median of the rounds)")
            if scenario == "both" and open_loop:
                line += "; open loop: the rates are equal by design, compare CPU per message"
            elif scenario == "both":
                cost = 1 - statistics.median(ratios)
                line += f"; cost {100 * cost:.0f} % of msg/s (target <= 25 %: " \
                        f"{'met' if cost <= 0.25 else 'MISSED'})"
            lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--messages", type=int, default=MESSAGES, help="per run")
    ap.add_argument("--sessions", type=int, default=SESSIONS)
    ap.add_argument("--size", type=int, default=SIZE)
    ap.add_argument("--only", default="sign,verify,both",
                    help="comma-separated scenarios among sign, verify, both")
    ap.add_argument("--quiet-wait", type=float, default=300.0,
                    help="seconds to wait before each round for the machine to be quiet")
    ap.add_argument("--rate", type=float, default=None,
                    help="open loop at this many msg/s (an asyncio client instead of "
                         "smtp-source), to compare CPU per message at the same pace")
    ap.add_argument("--source", default=None, help="run our server from this commit or tree")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    args = ap.parse_args(argv)
    if not os.access(SMTP_SOURCE, os.X_OK):
        print(f"{SMTP_SOURCE} missing (Debian package postfix)", file=sys.stderr)
        return 2
    chosen = [s for s in args.only.split(",") if s]
    if any(s not in SCENARIOS for s in chosen):
        ap.error(f"--only: choose among {', '.join(SCENARIOS)}")

    from mailappliance.testing.dnsserver import DNSServerProcess
    scratch = Path(tempfile.mkdtemp(prefix="mailauth-bench-", dir=args.scratch))
    source = prepare_source(args.source, scratch)
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    zones, eml, eml_size = outside_world(scratch, args.size)
    rules = scratch / "tcp.smtp"
    rules.write_text('::1:allow,RELAYCLIENT=""\n:allow\n')
    runs: list[dict] = []
    dns = DNSServerProcess(zones).start()
    world = {"dns": dns, "nameserver": dns.nameserver, "rules": rules, "eml": eml, "env": env}
    try:
        for scenario in chosen:
            sides = SCENARIOS[scenario]
            for rnd in range(args.rounds):
                order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]
                if rnd % 2:
                    order = order[::-1]
                quiet = wait_quiet(args.quiet_wait)
                for side in order:
                    r = one_run(scenario, side, rnd, scratch / "run", world, args)
                    r["quiet_before_pct"] = quiet
                    runs.append(r)
                    print(f"{scenario:>6} {r['side']:>8} round {rnd + 1}: {r['rate']:6.1f} msg/s"
                          f"  {r['cpu_ms']:5.2f} ms CPU/msg  server {r['server_cpu_pct']:.0f} %"
                          f"  {r['found']}/{r['sent']} on disk  dns {r['dns_queries']} queries"
                          f"  others {r['others_pct']:.0f} %"
                          + (f"  PROBLEMS {r['problems']}" if r["problems"] else ""),
                          flush=True)
    finally:
        dns.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    load = f"open loop at {args.rate:g} msg/s (asyncio client)" if args.rate else \
        "closed loop (smtp-source)"
    lines = [f"mailauth_bench: {load}, {args.sessions} sessions, {args.size}-byte messages "
             f"(internet stream: a {eml_size}-byte signed file), {args.messages} messages per "
             f"run, {args.rounds} rounds, sides alternating; source {source or 'working tree'}",
             f"machine: {machine_info()}"]
    for scenario in chosen:
        lines += summary(runs, scenario, SCENARIOS[scenario], bool(args.rate))
    bad = [r for r in runs if r["problems"]]
    if bad:
        lines.append(f"WARNING: {len(bad)} runs with problems: "
                     + "; ".join(f"{r['scenario']}/{r['side']}/{r['round']}: {r['problems']}"
                                 for r in bad))
    text = "\n".join(lines)
    print(text)
    path = write_results("mailauth_bench", text, {"runs": runs, "args": vars(args)})
    print(f"results: {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
