"""End-to-end delivery benchmark: accepted -> in Maildir/new, mailappliance vs a private Postfix.

    python benchmarks/e2e_bench.py [--messages 6000] [--senders 20]
        [--size 2048] [--half-seconds 15] [--half-rate R] [--no-smtp-source]
        [--source-rounds 3] [--only ours|postfix] [--profile] [--scratch /var/tmp] [--keep] [--source HEAD|DIR]

Both servers run in the same run, each in a fresh scratch folder on the real disk, on
127.0.0.1: ours is `twistd -n mailappliance` (domain test.com, user test@test.com); Postfix is a
private instance with the virtual Maildir domain test.com (benchmarks/peers/postfix.py; the
system instance is never touched, no smtp/lmtp client exists, so nothing can leave).

Phases, each server in turn:
 1. max load, closed loop: `--senders` concurrent senders, each sends its next message as soon
    as the previous one got its 250 (a new connection per message, like smtp-source; MAIL,
    RCPT and DATA pipelined when the server offers PIPELINING).  e2e msgs/s = messages / (last
    arrival in Maildir/new - first connect); also accepted msgs/s and latency p50/p99.
 2. smtp-source cross-check: the same count sent by postfix's C load generator (20 sessions),
    e2e msgs/s from the arrival times alone, to show whether the Python client limits phase 1.
    Run `--source-rounds` times (3), the servers taking turns at going first; the table shows
    the first round, the verdicts every round's ratio and the ratio of the mean rates.
 3. half load, open loop: messages sent at a fixed rate, by default half of Postfix's phase-1
    e2e rate (issue 4: "p99 latency under 100 ms at half of that load"), for --half-seconds;
    latency p50/p99/max.

Latency of a message = time its Maildir file appeared in new/ minus the time the client read
the 250 reply to its DATA.  Arrivals are timestamped by a separate watcher process
(inotify IN_CREATE | IN_MOVED_TO on new/, through ctypes; `python benchmarks/common.py watch`),
so the client's GIL never delays a timestamp; both sides use CLOCK_MONOTONIC (time.monotonic),
which is system-wide on Linux.  Files are matched to messages by an X-Bench-Id header.

Results go to benchmarks/results/<time>-e2e.{txt,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DELIVERY_TIMEOUT, wait_delivered  # noqa: E402
from benchmarks.common import (DEFAULT_SCRATCH, HOST, RCPT, SENDER,  # noqa: E402
                               HeaderCache, MaildirWatcher, Meter, OurServer, PostfixPeer,
                               ServerUnavailable, fmt, machine_info, percentile,
                               prepare_source, profile_lines, py_spy_record, ratio,
                               run_smtp_source, settle, table, wait_quiet,
                               write_results)

SENDERS = 20
MESSAGES = 6000
SIZE = 2048
HALF_SECONDS = 15.0
# One message's whole SMTP conversation must finish within this (a hang is a failure, not a
# stall of the benchmark).
MESSAGE_TIMEOUT = 60.0
# Reply lines read per reply at most (a multi-line EHLO reply has about ten).
MAX_REPLY_LINES = 100
# After the last 250 the harness waits for the remaining deliveries (common.wait_delivered:
# at most DELIVERY_TIMEOUT, and not once nothing arrived for DELIVERY_STALL: the server is not
# delivering; Postfix and a working queue deliver a backlog of thousands within seconds here).
# Issue 4 targets.
TARGET_P99_MS = 100.0
# A phase during which other processes on the shared machine used more than this much CPU (% of
# one core) is "disturbed" and its pair is measured again (--attempts).
DISTURBED_PCT = 25.0
PROFILE_SECONDS = 8
# Messages in the profiled run: more than 20 senders get through in PROFILE_SECONDS.
PROFILE_MESSAGES = 8000


def make_message(run: str, i: int, size: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: e2e {run} {i}\r\n"
            f"Message-Id: <{run}.{i}@bench.test>\r\nX-Bench-Id: {run}.{i}\r\n\r\n").encode()
    line = b"X" * 76 + b"\r\n"
    body = line * max(0, (size - len(head)) // len(line))
    return head + body


class SMTPFailure(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    for _ in range(MAX_REPLY_LINES):
        line = await reader.readline()
        if not line:
            raise SMTPFailure("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)
    raise SMTPFailure("reply too long")


async def smtp_send(host: str, port: int, sender: str, rcpt: str, message: bytes) -> float:
    """One transaction on a new connection, MAIL/RCPT/DATA pipelined (our server and Postfix
    announce PIPELINING), no wait for QUIT's reply; -> seconds from the final dot to the 250."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if (await _reply(reader))[0] != 220:
            raise SMTPFailure("greeting")
        writer.write(b"EHLO bench.test\r\n")
        await _reply(reader)
        writer.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        codes = [(await _reply(reader))[0] for _ in range(3)]
        if codes != [250, 250, 354]:
            raise SMTPFailure(f"MAIL/RCPT/DATA {codes}")
        writer.write(message + b".\r\n")
        t_dot = time.monotonic()
        code, text = await _reply(reader)
        t_250 = time.monotonic()
        if code != 250:
            raise SMTPFailure(f"after DATA {code} {text[:80]!r}")
        writer.write(b"QUIT\r\n")
        return t_250 - t_dot
    finally:
        writer.close()


async def send_one(port: int, message: bytes) -> float:
    """One SMTP transaction on a new connection; returns time.monotonic() of the 250 to DATA."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        code, _ = await _reply(reader)
        if code != 220:
            raise SMTPFailure(f"greeting {code}")
        writer.write(b"EHLO bench.test\r\n")
        code, text = await _reply(reader)
        if code != 250:
            raise SMTPFailure(f"EHLO {code}")
        cmds = [f"MAIL FROM:<{SENDER}>\r\n".encode(), f"RCPT TO:<{RCPT}>\r\n".encode(),
                b"DATA\r\n"]
        want = (250, 250, 354)
        if b"PIPELINING" in text.upper():
            writer.write(b"".join(cmds))
            codes = [(await _reply(reader))[0] for _ in cmds]
        else:
            codes = []
            for c in cmds:
                writer.write(c)
                codes.append((await _reply(reader))[0])
                if codes[-1] != want[len(codes) - 1]:
                    break
        if tuple(codes) != want:
            raise SMTPFailure(f"MAIL/RCPT/DATA {codes}")
        # Messages are made of "X" lines and headers: nothing starts with a dot.
        writer.write(message + b".\r\n")
        code, text = await _reply(reader)
        t = time.monotonic()
        if code != 250:
            raise SMTPFailure(f"after DATA {code} {text[:80]!r}")
        writer.write(b"QUIT\r\n")
        try:
            await asyncio.wait_for(_reply(reader), 5)
        except (asyncio.TimeoutError, SMTPFailure, OSError):
            pass
        return t
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (asyncio.TimeoutError, OSError):
            pass


async def closed_loop(port: int, run: str, count: int, senders: int, size: int) -> dict:
    accepted: dict[str, float] = {}
    errors: list[str] = []
    next_i = iter(range(count))

    async def sender() -> None:
        for i in next_i:
            try:
                accepted[f"{run}.{i}"] = await asyncio.wait_for(
                    send_one(port, make_message(run, i, size)), MESSAGE_TIMEOUT)
            except (OSError, SMTPFailure, asyncio.TimeoutError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(senders)))
    return {"t0": t0, "t_end": time.monotonic(), "accepted": accepted, "errors": errors}


async def open_loop(port: int, run: str, count: int, senders: int, size: int,
                    rate: float) -> dict:
    """Message i starts at t0 + i/rate, with at most `senders` connections open at once."""
    accepted: dict[str, float] = {}
    errors: list[str] = []
    late = 0
    sem = asyncio.Semaphore(senders)
    tasks = []

    async def one(i: int) -> None:
        try:
            accepted[f"{run}.{i}"] = await asyncio.wait_for(
                send_one(port, make_message(run, i, size)), MESSAGE_TIMEOUT)
        except (OSError, SMTPFailure, asyncio.TimeoutError, ValueError) as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            sem.release()

    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem.locked():
            late += 1
        await sem.acquire()
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    return {"t0": t0, "t_end": time.monotonic(), "accepted": accepted, "errors": errors,
            "late_starts": late}


def measure(server, label: str, run: str, sent: dict, arrivals: dict[str, float],
            overflow: int, ids: HeaderCache) -> dict:
    """Match arrivals to messages; latency and rates."""
    new = server.maildir / "new"
    latencies, last_arrival, matched, dup = [], None, 0, 0
    seen: set[str] = set()
    for name, t in arrivals.items():
        bid = ids.get(new / name)
        if bid is None:
            continue
        bid = bid.decode()
        if not bid.startswith(run + "."):
            continue
        if bid in seen:
            dup += 1
            continue
        seen.add(bid)
        t250 = sent["accepted"].get(bid)
        if t250 is None:
            continue  # delivered although the client saw no 250 (e.g. timed out after DATA)
        matched += 1
        latencies.append(t - t250)
        last_arrival = t if last_arrival is None else max(last_arrival, t)
    acc = sent["accepted"]
    n = len(acc)
    last_250 = max(acc.values()) if acc else None
    res = {
        "server": server.name, "phase": label, "sent_ok": n, "errors": len(sent["errors"]),
        "error_samples": sent["errors"][:5], "delivered_matched": matched,
        "duplicates": dup, "inotify_overflows": overflow,
        "accept_rate": n / (last_250 - sent["t0"]) if n else None,
        "e2e_rate": matched / (last_arrival - sent["t0"]) if matched else None,
        "p50_ms": _ms(percentile(latencies, 50)), "p90_ms": _ms(percentile(latencies, 90)),
        "p99_ms": _ms(percentile(latencies, 99)), "max_ms": _ms(max(latencies, default=None)),
        "late_starts": sent.get("late_starts"),
    }
    return res


def _ms(v):
    return None if v is None else 1000.0 * v


def phase(server, label: str, run: str, coro_factory, count: int, scratch: Path,
          ids: HeaderCache, profile_out: Path | None = None) -> dict:
    settle(server)
    before = sum(1 for _ in (server.maildir / "new").iterdir())
    watcher = MaildirWatcher(server.maildir / "new", scratch / f"watch-{server.name}-{run}.txt")
    watcher.start()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    spy = None
    try:
        with Meter(server.pid, tree=True) as m:
            if profile_out is not None:
                spy = py_spy_record(server.pid, PROFILE_SECONDS, profile_out)
            sent = asyncio.run(coro_factory())
            waited = wait_delivered(server.maildir, before, len(sent["accepted"]),
                                    DELIVERY_TIMEOUT)
    finally:
        arrivals, overflow = watcher.stop()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if spy is not None:
        try:
            spy.communicate(timeout=PROFILE_SECONDS + 30)
        except Exception:  # noqa: BLE001 - never hang on the profiler
            spy.kill()
    res = measure(server, label, run, sent, arrivals, overflow, ids)
    res.update({"count": count, "wait_after_last_250": round(waited, 2),
                "others_cpu_pct": max(0.0, m.system_busy_pct - 100.0 * m.cpu / m.wall - 100.0 * (
                    (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / m.wall),
                "server_cpu_pct": 100.0 * m.cpu / m.wall,
                "client_cpu_pct": 100.0 * ((ru1.ru_utime - ru0.ru_utime) +
                                           (ru1.ru_stime - ru0.ru_stime)) / m.wall,
                "peak_rss_kib": m.peak_rss_kib, "pending_after": server.pending()})
    return res


def smtp_source_phase(server, count: int, senders: int, size: int, scratch: Path) -> dict:
    """e2e msgs/s with smtp-source as the load: arrivals counted by the watcher."""
    settle(server)
    watcher = MaildirWatcher(server.maildir / "new", scratch / f"watch-{server.name}-ss.txt")
    before = sum(1 for _ in (server.maildir / "new").iterdir())
    watcher.start()
    try:
        with Meter(server.pid, tree=True) as m:
            t0 = time.monotonic()
            r = run_smtp_source(server.port, senders, count, size,
                                timeout=max(60.0, count * 0.1))
            wait_delivered(server.maildir, before, count, DELIVERY_TIMEOUT)
    finally:
        arrivals, _overflow = watcher.stop()
    waited = round(time.monotonic() - t0 - r["wall"], 2)
    times = sorted(t for t in arrivals.values() if t >= t0)
    got = min(len(times), count)
    return {"server": server.name, "phase": "smtp-source", "sent_ok": count if r["rc"] == 0
            else None, "rc": r["rc"], "stderr": r["stderr"][:300],
            "accept_rate": count / r["wall"] if r["rc"] == 0 else None,
            "e2e_rate": got / (times[got - 1] - t0) if got else None,
            "delivered_matched": got, "server_cpu_pct": 100.0 * m.cpu / m.wall,
            "others_cpu_pct": max(0.0, m.system_busy_pct - 100.0 * (m.cpu + r["client_cpu"])
                                  / m.wall),
            "wait_after_last_250": waited, "pending_after": server.pending(),
            "client_cpu_pct": 100.0 * r["client_cpu"] / m.wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=MESSAGES)
    ap.add_argument("--senders", type=int, default=SENDERS)
    ap.add_argument("--size", type=int, default=SIZE)
    ap.add_argument("--half-seconds", type=float, default=HALF_SECONDS)
    ap.add_argument("--half-rate", type=float, default=None,
                    help="msgs/s for the half-load phase (default: half of Postfix's e2e rate)")
    ap.add_argument("--no-smtp-source", action="store_true")
    ap.add_argument("--source-rounds", type=int, default=3,
                    help="smtp-source pairs to run (servers alternate who goes first); the "
                    "table shows the first, the verdict every round's ratio and their mean")
    ap.add_argument("--only", choices=("ours", "postfix"))
    ap.add_argument("--profile", action="store_true",
                    help="one more closed-loop run of our server under py-spy (not in the "
                    "table); hot spots in the report")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--attempts", type=int, default=3,
                    help="measure a phase again when other load disturbed it")
    ap.add_argument("--quiet-wait", type=float, default=300.0,
                    help="seconds to wait at most for the shared machine to be quiet first")
    ap.add_argument("--source", help="run our server from a commit (HEAD) or a directory")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="e2e-bench-", dir=args.scratch))
    scratch.chmod(0o755)   # Postfix's daemons (user postfix) must reach their directories
    args.source_used = prepare_source(args.source, scratch)
    kinds = [args.only] if args.only else ["postfix", "ours"]
    servers, unavailable, results, profiled = {}, {}, [], []
    source_pairs: list[dict] = []
    profile_path = scratch / "py-spy-ours-e2e.txt"
    stamp = time.strftime("%H%M%S")
    try:
        for kind in kinds:
            try:
                srv = (PostfixPeer(scratch / "postfix") if kind == "postfix"
                       else OurServer(scratch / "mailappliance"))
                servers[kind] = srv.start()
                print(f"{kind}: listening on 127.0.0.1:{srv.port} (pid {srv.pid})", flush=True)
            except ServerUnavailable as e:
                unavailable[kind] = str(e)
                print(f"{kind}: UNAVAILABLE: {e}", flush=True)
        ids = {k: HeaderCache("x-bench-id") for k in servers}

        def paired(label: str, one, keep: bool = True, reverse: bool = False) -> dict:
            """Run one(kind, srv, tag) for every server back to back after waiting for a quiet
            machine; a pair disturbed by other load is measured again (--attempts), the least
            disturbed pair is kept (in the table's results unless `keep` is false)."""
            best = None
            order = list(servers.items())
            if reverse:
                order.reverse()
            for attempt in range(1, args.attempts + 1):
                wait_quiet(args.quiet_wait)
                pair = {}
                for kind, srv in order:
                    r = one(kind, srv, f"{label}{stamp}{attempt}{kind}")
                    r["attempt"] = attempt
                    pair[kind] = r
                    print(f"{kind} {label}: {_line(r)}", flush=True)
                others = [r.get("others_cpu_pct") or 0.0 for r in pair.values()]
                disturbance = max(others)
                # Keep the pair with the least other load in total.
                if best is None or sum(others) < best[0]:
                    best = (sum(others), pair)
                if disturbance <= DISTURBED_PCT:
                    break
                print(f"  disturbed ({disturbance:.0f}% other CPU), attempt {attempt}", flush=True)
            if keep:
                results.extend(best[1].values())
            return best[1]

        maxres = paired("max", lambda kind, srv, run: phase(
            srv, "max", run, lambda: closed_loop(srv.port, run, args.messages, args.senders,
                                                 args.size), args.messages, scratch, ids[kind]))
        if not args.no_smtp_source:
            for k in range(max(1, args.source_rounds)):
                source_pairs.append(paired("smtp-source", lambda kind, srv, run:
                                           smtp_source_phase(srv, args.messages, args.senders,
                                                             args.size, scratch),
                                           keep=(k == 0), reverse=bool(k % 2)))
        # Half load: half of Postfix's rate (issue 4's reference), and also half of our own
        # max when that is clearly lower (how we do at half of what we can take).
        rates = []
        if args.half_rate:
            rates.append(("half", args.half_rate))
        else:
            ref = maxres.get("postfix") or maxres.get("ours")
            if ref and ref["e2e_rate"]:
                rates.append(("half", ref["e2e_rate"] / 2))
            own = maxres.get("ours")
            if (own and own["e2e_rate"] and rates and "postfix" in maxres
                    and own["e2e_rate"] / 2 < 0.9 * rates[0][1]):
                rates.append(("half-own", own["e2e_rate"] / 2))
        for label, rate in rates:
            count = max(1, int(rate * args.half_seconds))

            def half(kind, srv, run, label=label, rate=rate, count=count):
                r = phase(srv, label, run, lambda: open_loop(srv.port, run, count, args.senders,
                                                             args.size, rate),
                          count, scratch, ids[kind])
                r["rate_offered"] = rate
                return r
            paired(label, half)
        if args.profile and "ours" in servers:
            # An extra closed-loop run under py-spy, not in the table (py-spy stops the process
            # for every sample, so its rates are not comparable).
            srv = servers["ours"]
            run = f"prof{stamp}"
            r = phase(srv, "profiled", run, lambda: closed_loop(srv.port, run, PROFILE_MESSAGES,
                                                                 args.senders, args.size),
                      PROFILE_MESSAGES, scratch, ids["ours"], profile_path)
            profiled.append(r)
            print(f"ours under py-spy: {_line(r)}", flush=True)
    finally:
        for srv in servers.values():
            try:
                srv.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                print(f"stopping {srv.name}: {e}", flush=True)

    text = report(results, unavailable, args, profile_path if args.profile else None,
                  source_pairs)
    print(text)
    out = write_results("e2e", text, {"machine": machine_info(), "results": results,
                                      "smtp_source_rounds": source_pairs,
                                      "unavailable": unavailable, "profiled_run": profiled,
                                      "args": vars(args)})
    print(f"\nwritten: {out}")
    if args.profile and profile_path.exists():
        dest = out.with_name(out.stem + "-py-spy.txt")
        shutil.copy(profile_path, dest)
    if args.keep:
        print(f"scratch kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if not unavailable else 1


def _line(r: dict) -> str:
    if r.get("phase") == "smtp-source":
        return (f"e2e {fmt(r['e2e_rate'], 1)} msg/s, accepted {fmt(r['accept_rate'], 1)} msg/s, "
                f"rc {r['rc']} {r['stderr'][:100]}, others {fmt(r['others_cpu_pct'])}%")
    return (f"sent {r['sent_ok']} ({r['errors']} errors), delivered {r['delivered_matched']}, "
            f"accepted {fmt(r['accept_rate'], 1)}/s, e2e {fmt(r['e2e_rate'], 1)}/s, "
            f"p50 {fmt(r['p50_ms'], 1)} ms, p99 {fmt(r['p99_ms'], 1)} ms, "
            f"server CPU {fmt(r['server_cpu_pct'])}%, client CPU {fmt(r['client_cpu_pct'])}%, "
            f"others {fmt(r['others_cpu_pct'])}%"
            + (f"; errors e.g. {r['error_samples'][:2]}" if r["errors"] else ""))


def report(results: list[dict], unavailable: dict, args, profile_path,
           source_pairs: list[dict] | None = None) -> str:
    by = {(r["server"], r["phase"]): r for r in results}
    rows = []
    for ph, title in (("max", f"max, {args.senders} senders"),
                      ("smtp-source", f"smtp-source {args.senders} s."),
                      ("half", "half of postfix"), ("half-own", "half of ours")):
        for name in ("mailappliance", "postfix"):
            r = by.get((name, ph))
            if r is None:
                continue
            off = f" @{r['rate_offered']:.0f}/s" if r.get("rate_offered") else ""
            rows.append([f"{title}{off}", name, fmt(r.get("accept_rate"), 1),
                         fmt(r.get("e2e_rate"), 1),
                         f"{r.get('delivered_matched')}/{r.get('sent_ok')}",
                         fmt(r.get("p50_ms"), 1), fmt(r.get("p99_ms"), 1),
                         fmt(r.get("max_ms"), 1), fmt(r.get("server_cpu_pct")),
                         fmt(r.get("client_cpu_pct")), fmt(r.get("others_cpu_pct"))])
    lines = [f"End-to-end delivery (accepted -> Maildir/new), {args.size} B messages, "
             "new connection per message, 127.0.0.1",
             f"command: {' '.join(sys.argv)}",
             f"our code: {args.source_used or 'working tree'}", "",
             table(["phase", "server", "accepted/s", "e2e msg/s", "delivered", "p50 ms",
                    "p99 ms", "max ms", "server CPU%", "client CPU%", "others CPU%"], rows),
             "(CPU% of one core; 'others' = the rest of the shared machine during the phase; "
             "the watcher process counts there too)"]
    o, p = by.get(("mailappliance", "max")), by.get(("postfix", "max"))
    verdicts = []
    if o and p:
        verdicts.append(f"e2e msgs/s ours/postfix (Python client): "
                        f"{ratio(o['e2e_rate'], p['e2e_rate'])}; target >= 1.00x: "
                        + ("MET" if o["e2e_rate"] and p["e2e_rate"] and
                           o["e2e_rate"] >= p["e2e_rate"] else "NOT MET"))
    so, sp = by.get(("mailappliance", "smtp-source")), by.get(("postfix", "smtp-source"))
    if so and sp:
        verdicts.append(f"e2e msgs/s ours/postfix (smtp-source): "
                        f"{ratio(so['e2e_rate'], sp['e2e_rate'])}")
    rounds = [(pr["ours"]["e2e_rate"], pr["postfix"]["e2e_rate"]) for pr in source_pairs or ()
              if "ours" in pr and "postfix" in pr and pr["ours"].get("e2e_rate")
              and pr["postfix"].get("e2e_rate")]
    if len(rounds) > 1:
        mean_o = sum(o for o, _ in rounds) / len(rounds)
        mean_p = sum(p for _, p in rounds) / len(rounds)
        verdicts.append(f"smtp-source, {len(rounds)} rounds (first server alternating): "
                        + ", ".join(f"{o:.1f}/{p:.1f} = {o / p:.2f}x" for o, p in rounds)
                        + f"; mean {mean_o:.1f}/{mean_p:.1f} = {mean_o / mean_p:.2f}x")
    h = by.get(("mailappliance", "half"))
    if h and h["p99_ms"] is not None:
        verdicts.append(f"p99 at half of Postfix's max ({h['rate_offered']:.0f}/s) < "
                        f"{TARGET_P99_MS:.0f} ms: "
                        f"{'MET' if h['p99_ms'] < TARGET_P99_MS else 'NOT MET'} "
                        f"({h['p99_ms']:.1f} ms)")
    h = by.get(("mailappliance", "half-own"))
    if h and h["p99_ms"] is not None:
        verdicts.append(f"(p99 at half of our own max, {h['rate_offered']:.0f}/s: "
                        f"{h['p99_ms']:.1f} ms)")
    for r in results:
        if r.get("sent_ok") and (r.get("delivered_matched") or 0) < r["sent_ok"]:
            verdicts.append(f"{r['server']} {r['phase']}: only {r.get('delivered_matched')} of "
                            f"{r['sent_ok']} accepted messages reached Maildir/new (waited "
                            f"{r.get('wait_after_last_250', '?')} s after the last 250; "
                            f"{r.get('pending_after', '?')} still in the queue)")
        if r.get("errors") or r.get("duplicates") or r.get("inotify_overflows"):
            verdicts.append(f"{r['server']} {r['phase']}: errors {r.get('errors')}, "
                            f"duplicates {r.get('duplicates')}, inotify overflows "
                            f"{r.get('inotify_overflows')} {r.get('error_samples', '')}")
    for kind, why in unavailable.items():
        verdicts.append(f"{kind}: not measured: {why}")
    lines += [""] + verdicts
    if profile_path is not None:
        lines += profile_lines(profile_path, PROFILE_SECONDS,
                               "hot spots, ours, closed loop 20 senders (extra run)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
