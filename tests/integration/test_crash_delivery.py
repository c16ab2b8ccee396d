"""kill -9 of the real server in the middle of local and of remote delivery loses nothing:
after a restart every message is delivered, and only deliveries in flight at the crash may
arrive twice."""

from __future__ import annotations

import collections
import re

import pytest

from mailappliance.queue.store import QueueStore
from tests.integration.delivery_support import (SmtpSink, maildir_files, queue_ids,
                                                wait_until)

# Messages queued before the server starts: enough that delivery takes a while (over a second
# at the fastest local delivery rate seen), so the kill
# lands in the middle of it.
MESSAGES = 1500
# The kill happens once at least this many have been delivered.
KILL_AFTER = 40
MARKER = re.compile(rb"crash-marker-(\d+)-end")


def make(make_server, extra=""):
    srv = make_server(f'default_domain = "test.com"\n{extra}')
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    return srv


def fill_queue(srv, rcpt):
    store = QueueStore(srv.data / "queue")
    for i in range(MESSAGES):
        store.inject(b"Subject: crash test %d\n\ncrash-marker-%d-end\n" % (i, i),
                     "test@test.com", [rcpt], trigger=False)


def restart_and_count(srv, number_of) -> collections.Counter:
    """Start the killed server again, wait until its queue is empty, and count the deliveries
    of each message: `number_of(path, data)` checks a Maildir file and returns its number."""
    srv.start()
    wait_until(lambda: queue_ids(srv) == [], timeout=120, what="the queue to empty")
    counts = collections.Counter()
    for path in maildir_files(srv):
        counts[number_of(path, path.read_bytes())] += 1
    return counts


def check(counts: collections.Counter, limit_in_flight: int):
    missing = [i for i in range(MESSAGES) if counts[i] == 0]
    assert missing == [], f"{len(missing)} messages lost, e.g. {missing[:5]}"
    dups = [i for i, n in counts.items() if n > 1]
    # a duplicate is acceptable only for a delivery in flight at the crash
    assert len(dups) <= limit_in_flight, dups
    assert set(counts) == set(range(MESSAGES))


def test_kill_9_during_local_delivery_loses_nothing(make_server):
    srv = make(make_server)
    fill_queue(srv, "test@test.com")
    srv.start()
    wait_until(lambda: len(maildir_files(srv)) >= KILL_AFTER, what="deliveries to start")
    srv.kill()
    left = len(queue_ids(srv))
    assert left > 0, "the crash came too late to test anything (all delivered already)"

    def number_of(path, data):
        m = MARKER.search(data)
        assert m and data.endswith(m.group(0) + b"\n"), f"partial file in new/: {path}"
        return int(m.group(1))

    check(restart_and_count(srv, number_of), limit_in_flight=10)


def test_kill_9_during_remote_delivery_loses_nothing(make_server, tmp_path):
    sink = SmtpSink(tmp_path / "sink").start()
    try:
        srv = make(make_server, f'\n[routes]\n"example.org" = "127.0.0.1:{sink.port}"\n')
        fill_queue(srv, "bob@example.org")
        srv.start()
        wait_until(lambda: len(list(sink.dump.iterdir())) >= KILL_AFTER,
                   what="remote deliveries to start")
        srv.kill()
        left = len(queue_ids(srv))
        assert left > 0, "the crash came too late to test anything (all delivered already)"
        srv.start()
        wait_until(lambda: queue_ids(srv) == [], timeout=120, what="the queue to empty")
        counts = collections.Counter()
        for t in sink.transactions():
            m = MARKER.search(t.body)
            if m:   # a transaction cut by the kill has no end marker and did not count
                counts[int(m.group(1))] += 1
        check(counts, limit_in_flight=20)
        assert "bounce msg" not in srv.output()
    finally:
        sink.close()


def test_kill_9_while_mail_flows_through_recycled_queue_files_loses_nothing(make_server):
    """The queue reuses finished messages' files (queue/free/, docs/ARCHITECTURE.md): with
    mail arriving and being delivered at once, kill -9 in the middle, then restart. Every
    message that got its 250 arrives, each Maildir file holds exactly one whole message
    (nothing of an earlier message that used the same file), and free/ files never turn
    into mail."""
    import smtplib
    import threading

    srv = make(make_server)
    srv.start()
    free = srv.data / "queue" / "free"
    accepted: list[int] = []
    stop = threading.Event()
    sizes = (40, 3000, 200, 9000, 700)      # lengths vary: reused files grow and shrink

    def body(i: int) -> bytes:
        pad = b"p" * sizes[i % len(sizes)]
        return b"Subject: flow %d\r\n\r\n%s\r\ncrash-marker-%d-end\r\n" % (i, pad, i)

    def client():
        i = 0
        try:
            with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as c:
                while not stop.is_set():
                    c.sendmail("a@example.org", ["test@test.com"], body(i))
                    accepted.append(i)
                    i += 1
        except (OSError, smtplib.SMTPException):
            pass                        # the kill: whatever had no 250 does not count

    t = threading.Thread(target=client, daemon=True)
    t.start()
    wait_until(lambda: len(accepted) >= 300 and free.exists() and any(free.iterdir()),
               timeout=60, what="mail flowing through recycled files")
    srv.kill()
    stop.set()
    t.join(30)

    def number_of(path, data):
        found = MARKER.findall(data)
        assert len(found) == 1, f"{path} holds {len(found)} markers"
        i = int(found[0])
        assert data.endswith(body(i).replace(b"\r\n", b"\n")), f"{path} is not message {i}"
        return i

    counts = restart_and_count(srv, number_of)
    missing = [i for i in accepted if counts[i] == 0]
    assert missing == [], f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    assert sum(n - 1 for n in counts.values() if n > 1) <= 10     # only those in flight
