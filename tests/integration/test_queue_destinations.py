"""Destinations through the real server (issues 18 and 19): a dead destination costs one
connection attempt however many messages wait for it, the others keep moving, and its
backlog drains when it is back; slow destinations cannot take every remote slot."""

from __future__ import annotations

import re

from mailappliance.queue.store import QueueStore
from tests.integration.delivery_support import (SmtpSink, TrickleMX, closed_port, queue_ids,
                                                wait_until)

# Messages waiting for the dead destination: many, for one attempt.
DEAD_MESSAGES = 30


def routed(make_server, routes: dict[str, int], queue: str = ""):
    srv = make_server('default_domain = "test.com"\n'
                      + (f"[queue]\n{queue}\n" if queue else "")
                      + "[routes]\n"
                      + "".join(f'"{d}" = "127.0.0.1:{p}"\n' for d, p in routes.items()))
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    return srv


def test_a_dead_destination_gets_one_attempt_for_many_messages_and_drains_when_back(
        make_server, tmp_path):
    dead_port = closed_port()
    alive = SmtpSink(tmp_path / "alive").start()
    back = None
    try:
        # One delivery at a time per destination: then exactly one attempt reaches the dead
        # one before it is known dead (in general: at most concurrency_destination).
        srv = routed(make_server, {"dead.example": dead_port, "alive.example": alive.port},
                     queue="concurrency_destination = 1")
        store = QueueStore(srv.data / "queue")
        for i in range(DEAD_MESSAGES):
            store.inject(b"Subject: to the dead %d\n\nhello\n" % i, "test@test.com",
                         [f"u{i}@dead.example"], trigger=False)
        srv.start()
        store.inject(b"Subject: to the living\n\nhello\n", "test@test.com",
                     ["v@alive.example"])
        wait_until(lambda: alive.transactions(), what="the living destination's message")
        out = wait_until(
            lambda: srv.output().count("deferral: Not_tried:_[127.0.0.1]:%d" % dead_port)
            >= DEAD_MESSAGES - 1 and srv.output(), what="every message deferred")
        connects = re.findall(r"remote: cannot connect to 127\.0\.0\.1:%d" % dead_port, out)
        assert len(connects) == 1, "one connection attempt for %d messages" % DEAD_MESSAGES
        assert len(re.findall(r"Z delivery: destination \S+ is dead: Sorry,_I_wasn't_able",
                              out)) == 1
        assert len(queue_ids(srv)) == DEAD_MESSAGES
        listing = srv.cli("queue", "list").stdout
        assert "last error: Not tried: [127.0.0.1]:%d could not be reached" % dead_port \
            in listing
        # It comes back; an operator's flush (or its own retry, 300 s on) sends everything.
        back = SmtpSink(tmp_path / "back", port=dead_port).start()
        flushed = srv.cli("queue", "flush", "@dead.example").stdout
        assert flushed.startswith(f"{DEAD_MESSAGES} deferred messages with recipients at "
                                  "dead.example")
        wait_until(lambda: queue_ids(srv) == [], what="the backlog to drain")
        assert len(back.transactions()) == DEAD_MESSAGES
    finally:
        alive.close()
        if back is not None:
            back.close()


def test_two_hung_destinations_do_not_block_remote_mail_to_a_third(make_server, tmp_path):
    """Issue 18: two messages at an MX that trickles its greeting used to hold every remote
    slot. With 5 remote slots and 2 per destination, two hung destinations with three
    messages each hold 4 slots, and a third destination still gets its mail at once (without
    per-destination limits the six would hold all five)."""
    slow1, slow2 = TrickleMX(), TrickleMX()
    fast = SmtpSink(tmp_path / "fast").start()
    try:
        srv = routed(make_server, {"slow1.example": slow1.port, "slow2.example": slow2.port,
                                   "fast.example": fast.port},
                     queue="concurrency_remote = 5\nconcurrency_destination = 2")
        store = QueueStore(srv.data / "queue")
        for dest in ("slow1.example", "slow2.example"):
            for i in range(3):
                store.inject(b"Subject: slow\n\nhello\n", "test@test.com", [f"u{i}@{dest}"],
                             trigger=False)
        srv.start()
        wait_until(lambda: len(slow1._threads) - 1 == 2 and len(slow2._threads) - 1 == 2,
                   what="two connections to each hung destination")
        store.inject(b"Subject: fast\n\nhello\n", "test@test.com", ["v@fast.example"])
        wait_until(lambda: fast.transactions(), what="the third destination's message")
        # the hung ones still hold their two slots each, and no more
        assert len(slow1._threads) - 1 == 2 and len(slow2._threads) - 1 == 2
        assert sorted(queue_ids(srv)) and len(queue_ids(srv)) == 6
    finally:
        slow1.close()
        slow2.close()
        fast.close()


# A deferred queue for the restart test: more messages than a test needs to see the point
# (none of them is held in memory), few enough to write in a second or two.
DEFERRED = 3000


def write_deferred(queue_dir, n: int, rcpt: str, next_try: float) -> None:
    """n messages already deferred (next try = mtime), written with the store's own code
    without an fsync each (a test fixture, not an acknowledged message)."""
    import os
    from mailappliance.fileops import write_all
    store = QueueStore(queue_dir)
    for i in range(n):
        tmp = store.begin()
        qid = tmp.finish("test@test.com", [rcpt], data=b"Subject: deferred %d\n\nx\n" % i,
                         birth=next_try - 7200, write=False)
        write_all(store.ops, tmp.fd, tmp._tail)
        os.close(tmp.fd)
        os.rename(tmp.path, store.message_path(qid))
        os.utime(store.message_path(qid), (next_try, next_try))


def test_a_restarted_server_keeps_a_deferred_queue_out_of_memory_and_lists_it_by_pages(
        make_server):
    import time
    srv = routed(make_server, {"far.example": closed_port()})
    write_deferred(srv.data / "queue", DEFERRED, "u@far.example", time.time() + 3600)
    srv.start()
    stat = srv.cli("stat").stdout
    assert f"messages in queue: {DEFERRED}" in stat
    assert f"messages in memory: 0 of at most 10000; in the backlog: {DEFERRED}" in stat
    assert re.search(r"oldest message in queue: 36\d\d seconds", stat), stat
    page = srv.cli("queue", "list", "--limit", "10").stdout.splitlines()
    assert page[-1] == f"{DEFERRED} messages"
    assert page[-2].startswith(f"... {DEFERRED - 10} more messages: queue list --after ")
    # `queue flush` reaches them: all due now, to a destination that refuses (one attempt
    # reaches it before it is known dead, then the rest are deferred without trying).
    flushed = srv.cli("queue", "flush").stdout
    assert flushed.startswith(f"{DEFERRED} deferred messages scheduled for delivery now")
    wait_until(lambda: srv.output().count("deferral: Not_tried:") >= DEFERRED - 5,
               what="every message deferred")
    assert len(re.findall(r"remote: cannot connect to", srv.output())) <= 5
