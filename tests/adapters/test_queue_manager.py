"""queue/manager.py (qmail-send) with a real queue directory, Clock time and fake deliverers."""

from __future__ import annotations

import os

import pytest
from twisted.logger import capturedLogs, formatEvent

from mailappliance.delivery.interfaces import IMessageSource
from mailappliance.envelope import (DELIVERED, TODO, Envelope, Recipient, deferral, failure,
                                    success)
from mailappliance.queue import manager as qm
from mailappliance.queue import schedule
from mailappliance.queue.bounce import DOUBLE_BOUNCE_SENDER
from mailappliance.queue.inject import Injector
from mailappliance.queue.schedule import LOCAL, REMOTE
from mailappliance.queue.store import QueueStore
from mailappliance.testing.delivery import FakeLocalDeliverer, FakeRemoteDeliverer
from mailappliance.testing.threads import ImmediateThreadPool, ThreadlessReactor

EPOCH = 1_700_000_000.0
LOCAL_DOMAINS = {"test.com", "mail.test.com"}


def classify(address: str) -> str:
    return LOCAL if address.rpartition("@")[2].lower() in LOCAL_DOMAINS else REMOTE


class World:
    def __init__(self, tmp_path, start=True, **kw):
        self.reactor = ThreadlessReactor()
        self.reactor.advance(EPOCH)
        self.pool = ImmediateThreadPool()
        self.store = kw.pop("store_class", QueueStore)(tmp_path / "queue",
                                                       clock=self.reactor.seconds)
        self.local = kw.pop("local", None) or FakeLocalDeliverer()
        self.remote = kw.pop("remote", None) or FakeRemoteDeliverer()
        self.manager = None
        if kw.pop("read_back", False):      # the pick-up path that reads the file
            self.injector = Injector(self.store, self.reactor, self.pool,
                                     on_commit=lambda qid: self.manager.notify(qid))
        else:
            self.injector = Injector(self.store, self.reactor, self.pool,
                                     on_commit_envelope=lambda e: self.manager.notify_envelope(e))
        args = dict(local=self.local, remote=self.remote, injector=self.injector,
                    reactor=self.reactor, threadpool=self.pool, classify=classify,
                    postmaster="postmaster@test.com", hostname="mail.test.com",
                    use_trigger=False)
        args.update(kw)
        self.manager = qm.QueueManager(self.store, **args)
        if start:
            self.manager.startService()

    def inject(self, sender, rcpts, body=b"Subject: t\n\nhello\n"):
        out = []
        self.injector.inject(body, sender, rcpts).addBoth(out.append)
        assert out and isinstance(out[0], int), out
        return out[0]

    def restart(self, **kw):
        """A new manager on the same queue directory (the old one is simply dropped, as by
        kill -9: nothing it held in memory survives)."""
        self.manager.running = False
        args = dict(local=self.local, remote=self.remote, injector=self.injector,
                    reactor=self.reactor, threadpool=self.pool, classify=classify,
                    postmaster="postmaster@test.com", hostname="mail.test.com",
                    use_trigger=False)
        args.update(kw)
        self.manager = qm.QueueManager(self.store, **args)
        self.manager.startService()

    def advance(self, seconds):
        self.reactor.advance(seconds)


def text_of(events):
    return [formatEvent(e) for e in events]


@pytest.mark.parametrize("read_back", [False, True])
def test_local_message_is_delivered_at_once_with_qmail_log_lines(tmp_path, read_back):
    with capturedLogs() as events:
        w = World(tmp_path, read_back=read_back)
        qid = w.inject("alice@example.org", ["test@test.com"])
    assert w.local.calls == [(qid, "test@test.com")]
    assert w.store.list_ids() == []
    lines = text_of(events)
    # The log names a message number.hex (queue/naming.py): an inode number is reused.
    name = next(l for l in lines if l.startswith("new msg ")).split()[2]
    number, check = name.split(".")
    assert int(number) == qid and len(check) == 8
    expected = [
        f"new msg {name}",
        f"info msg {name}: bytes 18 from <alice@example.org> qp {qid} uid {os.getuid()}",
        f"starting delivery 1: msg {name} to local test@test.com",
        "status: local 1/10 remote 0/20",
        "delivery 1: success: did_1+0+0/",
        "status: local 0/10 remote 0/20",
        f"end msg {name}",
    ]
    assert [l for l in lines if l in expected] == expected


@pytest.mark.parametrize("read_back", [False, True])
def test_crash_after_three_of_five_redelivers_only_the_other_two(tmp_path, read_back):
    w = World(tmp_path, read_back=read_back)
    w.local.hold = True
    rcpts = [f"r{i}@test.com" for i in range(5)]
    qid = w.inject("a@example.org", rcpts)
    assert len(w.local.held) == 5
    for d in w.local.held[:3]:
        d.callback(success("did 1+0+0/"))
    env = w.store.read_envelope(qid)
    assert [r.state for r in env.recipients] == [DELIVERED] * 3 + [TODO] * 2
    # kill -9 now: the other two were in flight
    w.local.hold = False
    w.local.calls.clear()
    w.restart()
    assert sorted(a for _q, a in w.local.calls) == ["r3@test.com", "r4@test.com"]
    assert w.store.list_ids() == []


def test_deferral_retries_on_qmail_schedule(tmp_path):
    w = World(tmp_path)
    w.local.script["test@test.com"] = deferral("Recipient's mailbox is full. (#4.2.2)")
    qid = w.inject("a@example.org", ["test@test.com"])
    birth = w.store.read_envelope(qid).birth
    assert len(w.local.calls) == 1
    # next try at birth + (isqrt(0) + 10)^2 = birth + 100
    assert w.store.next_try(qid) == birth + 100
    w.advance(99)
    assert len(w.local.calls) == 1
    w.advance(1)
    assert len(w.local.calls) == 2
    # then birth + (isqrt(100) + 10)^2 = birth + 400
    w.advance(299)
    assert len(w.local.calls) == 2
    del w.local.script["test@test.com"]
    w.advance(1)
    assert len(w.local.calls) == 3
    assert w.store.list_ids() == []


def test_remote_retries_use_remote_chanskip(tmp_path):
    w = World(tmp_path)
    w.remote.script["bob@example.org"] = deferral("Connection refused. (#4.4.1)")
    qid = w.inject("a@test.com", ["bob@example.org"])
    birth = w.store.read_envelope(qid).birth
    assert w.store.next_try(qid) == birth + 400


def test_lifetime_ends_with_one_last_attempt_and_a_bounce(tmp_path):
    w = World(tmp_path, lifetime=3600)
    w.remote.script["bob@example.org"] = deferral("Connection refused. (#4.4.1)")
    qid = w.inject("alice@test.com", ["bob@example.org"])
    with capturedLogs() as events:
        for _ in range(200):
            w.advance(60)
            if qid not in w.store.list_ids():
                break
    attempts = [c for c in w.remote.calls if c[1] == ["bob@example.org"]]
    assert 2 <= len(attempts) <= 4        # 0 s, 400 s, 1600 s, then the last one at 3600 s
    lines = text_of(events)
    assert any(l.startswith("delivery ") and ": failure: Connection_refused._(#4.4.1)/I'm_not_"
               "going_to_try_again;_this_message_has_been_in_the_queue_too_long." in l
               for l in lines), lines
    assert any(l.startswith(f"bounce msg {qid}.") and " qp " in l for l in lines)
    # the bounce went to the sender (local here), with qmail's text
    bounce_calls = [a for q, a in w.local.calls if a == "alice@test.com"]
    assert bounce_calls == ["alice@test.com"]
    assert w.store.list_ids() == []


def test_failure_bounces_double_bounces_and_triple_bounce_is_dropped(tmp_path):
    w = World(tmp_path)
    captured = {}
    real_deliver = w.local.deliver

    def deliver(env, index, messages):
        captured.setdefault(env.recipients[index].address, []).append(
            (env.sender, messages.read_message(env)))
        return real_deliver(env, index, messages)

    w.local.deliver = deliver
    no = failure("Sorry, no mailbox here by that name. (#5.1.1)")
    w.local.script.update({"nobody@test.com": no, "alice@test.com": no,
                           "postmaster@test.com": no})
    with capturedLogs() as events:
        qid = w.inject("alice@test.com", ["nobody@test.com"])
    # bounce to alice (sender <>), which fails -> double bounce to postmaster (sender #@[]),
    # which fails -> triple bounce: logged and dropped
    (b_sender, b_body), = captured["alice@test.com"]
    assert b_sender == ""
    assert b"Hi. This is the qmail-send program at mail.test.com." in b_body
    assert (b"<nobody@test.com>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
            b"--- Below this line is a copy of the message.\n") in b_body
    assert b"\nFinal-Recipient: rfc822; nobody@test.com\nAction: failed\nStatus: 5.1.1\n" in b_body
    assert b"Content-Type: message/rfc822\nContent-Transfer-Encoding: 7bit\n\n" \
           b"Return-Path: <alice@test.com>\nSubject: t\n\nhello\n" in b_body
    (d_sender, d_body), = captured["postmaster@test.com"]
    assert d_sender == DOUBLE_BOUNCE_SENDER
    assert b"the bounce bounced!" in d_body and b"To: postmaster@test.com" in d_body
    lines = text_of(events)
    assert sum(1 for l in lines if l.startswith("bounce msg ")) == 2
    assert sum(1 for l in lines if l.startswith("triple bounce: discarding bounce/")) == 1
    assert w.store.list_ids() == []
    assert w.manager.stats["bounces"] == 1 and w.manager.stats["double_bounces"] == 1
    assert w.manager.stats["triple_bounces"] == 1


def test_partial_failure_bounces_only_the_failed_recipient(tmp_path):
    w = World(tmp_path)
    w.remote.script["bad@example.org"] = failure("example.org does not like recipient./"
                                                 "Remote host said: 550 no such user")
    qid = w.inject("alice@test.com", ["good@example.org", "bad@example.org"])
    assert w.remote.calls[0] == (qid, ["good@example.org", "bad@example.org"])  # one transaction
    bounce = [c for c in w.local.calls if c[1] == "alice@test.com"]
    assert len(bounce) == 1
    assert w.store.list_ids() == []


def test_concurrency_limits_and_slow_remote_does_not_starve_local(tmp_path):
    w = World(tmp_path, concurrency_local=2, concurrency_remote=1)
    w.local.hold = w.remote.hold = True
    for i in range(3):
        w.inject("a@test.com", [f"x{i}@remote{i}.example"])
    for i in range(5):
        w.inject("a@example.org", [f"u{i}@test.com"])
    assert len(w.remote.held) == 1       # remote limit 1, the others wait
    assert len(w.local.held) == 2        # local limit 2, independent of the stuck remote
    assert w.manager.status()["local_busy"] == 2 and w.manager.status()["remote_busy"] == 1
    w.local.held[0].callback(success("did 1+0+0/"))
    assert len(w.local.held) == 3
    for _ in range(10):
        for d in list(w.local.held):
            if not d.called:
                d.callback(success("did 1+0+0/"))
    assert len(w.local.calls) == 5
    assert len(w.remote.held) == 1       # remote still stuck at one
    w.remote.held[0].callback([success("ok")])
    assert len(w.remote.held) == 2


def test_remote_recipients_grouped_by_domain(tmp_path):
    w = World(tmp_path)
    qid = w.inject("a@test.com", ["a@x.example", "b@y.example", "c@X.example", "d@test.com"])
    groups = sorted(sorted(a) for q, a in w.remote.calls)
    assert groups == [["a@x.example", "c@X.example"], ["b@y.example"]]
    assert w.local.calls == [(qid, "d@test.com")]


def test_corrupt_entry_is_moved_aside_and_others_still_flow(tmp_path):
    w = World(tmp_path, start=False)
    with open(os.path.join(w.store.mess_dir, "12345"), "wb") as f:
        f.write(b"this is not a queue file")
    with capturedLogs() as events:
        w.manager.startService()
        qid = w.inject("a@example.org", ["test@test.com"])
    assert os.listdir(w.store.mess_dir) == []
    [moved] = os.listdir(w.store.corrupt_dir)
    assert moved.startswith("12345.")
    assert any("msg 12345 is corrupt" in l for l in text_of(events))
    assert w.local.calls == [(qid, "test@test.com")]


def test_stale_tmp_files_removed_at_start(tmp_path):
    w = World(tmp_path, start=False)
    t = w.store.begin()
    t.write(b"half a message")
    old = EPOCH - 37 * 3600
    os.utime(t.path, (old, old))
    w.manager.startService()
    assert w.store.tmp_files() == []
    assert w.manager.stats["tmp_removed"] == 1


def test_flush_retries_deferred_now(tmp_path):
    w = World(tmp_path)
    w.remote.script["b@example.org"] = deferral("timeout")
    w.inject("a@test.com", ["b@example.org"])
    assert len(w.remote.calls) == 1
    del w.remote.script["b@example.org"]
    assert w.manager.flush() == 1
    assert len(w.remote.calls) == 2
    assert w.store.list_ids() == []


def test_restart_keeps_the_retry_schedule(tmp_path):
    w = World(tmp_path)
    w.remote.script["b@example.org"] = deferral("timeout")
    qid = w.inject("a@test.com", ["b@example.org"])
    birth = w.store.read_envelope(qid).birth
    w.advance(10)
    w.restart()
    assert len(w.remote.calls) == 1       # not retried at once: next try is birth + 400
    w.advance(birth + 400 - w.reactor.seconds())
    assert len(w.remote.calls) == 2


def test_restart_after_everything_was_marked_finishes_the_message(tmp_path):
    """Crash after the last mark but before removal: no redelivery, the bounce still goes."""
    w = World(tmp_path, start=False)
    qid = w.inject("alice@example.org", ["a@test.com", "b@test.com"])
    env = w.store.read_envelope(qid)
    w.store.mark(env, [(0, DELIVERED)])
    w.store.add_failure(env, 1, "Sorry, no mailbox here by that name. (#5.1.1)")
    w.manager.startService()
    assert [a for _q, a in w.local.calls] == []
    assert [a for _q, a in w.remote.calls] == [["alice@example.org"]]   # the bounce
    assert w.store.list_ids() == []


def test_deliverer_exception_is_a_deferral_not_a_crash(tmp_path):
    w = World(tmp_path)

    def broken():
        raise RuntimeError("bug in a deliverer")

    w.local.script["test@test.com"] = broken
    qid = w.inject("a@example.org", ["test@test.com"])
    assert w.store.read_envelope(qid).recipients[0].state == TODO
    assert w.manager.stats["deferral"] == 1


def test_admin_remove_with_bounce(tmp_path):
    w = World(tmp_path)
    w.remote.script["b@example.org"] = deferral("timeout")
    qid = w.inject("alice@test.com", ["b@example.org"])
    out = []
    w.manager.remove(qid, bounce=True).addBoth(out.append)
    assert out == [True]
    assert [a for _q, a in w.local.calls] == ["alice@test.com"]
    assert w.store.list_ids() == []


def test_admin_remove_without_bounce_and_unknown_id(tmp_path):
    w = World(tmp_path)
    w.remote.script["b@example.org"] = deferral("timeout")
    qid = w.inject("alice@test.com", ["b@example.org"])
    out = []
    w.manager.remove(qid).addBoth(out.append)
    w.manager.remove(999999999).addBoth(out.append)
    assert out == [True, False]
    assert w.local.calls == [] and w.store.list_ids() == []


def test_list_and_status_for_admin(tmp_path):
    w = World(tmp_path)
    w.remote.script["b@example.org"] = deferral("timeout")
    qid = w.inject("alice@test.com", ["b@example.org", "c@test.com"])
    out = []
    w.manager.list().addBoth(out.append)
    [entries] = out
    assert [(e.qid, e.recipients) for e in entries] == [
        (qid, [("b@example.org", "todo"), ("c@test.com", "done")])]
    assert w.manager.status()["messages"] == 1


def test_message_injected_by_another_process_is_found_by_the_scan(tmp_path):
    w = World(tmp_path)
    other = QueueStore(tmp_path / "queue")
    qid = other.inject(b"x\n", "a@example.org", ["test@test.com"], trigger=False)
    assert w.local.calls == []
    w.advance(qm.SCAN_INTERVAL)
    assert w.local.calls == [(qid, "test@test.com")]


def test_trigger_datagram_starts_a_scan(tmp_path):
    w = World(tmp_path)
    other = QueueStore(tmp_path / "queue")
    qid = other.inject(b"x\n", "a@example.org", ["test@test.com"], trigger=False)
    qm._Trigger(w.manager).datagramReceived(b"!", None)
    assert w.local.calls == [(qid, "test@test.com")]


def test_a_trigger_naming_its_message_picks_up_that_message_without_a_scan(tmp_path):
    class Counting(QueueStore):
        scans = 0

        def changed_since(self, since):
            Counting.scans += 1
            return super().changed_since(since)

    w = World(tmp_path, store_class=Counting)
    other = QueueStore(tmp_path / "queue")
    qid = other.inject(b"x\n", "a@example.org", ["test@test.com"], trigger=False)
    qm._Trigger(w.manager).datagramReceived(b"!%d" % qid, None)
    assert w.local.calls == [(qid, "test@test.com")]
    assert Counting.scans == 0, "a queue of a million is not stat'ed for one message"
    qm._Trigger(w.manager).datagramReceived(b"!", None)
    assert Counting.scans == 1


def test_failed_result_recording_keeps_recipient_to_do(tmp_path):
    """If the mark cannot be written, the recipient stays to do (a duplicate, never a loss)."""
    w = World(tmp_path)
    w.local.hold = True
    qid = w.inject("a@example.org", ["a@test.com", "b@test.com"])
    path = w.store.message_path(qid)
    os.rename(path, path + ".away")          # the mark's open() fails
    with capturedLogs() as events:
        w.local.held[0].callback(success("did 1+0+0/"))
    os.rename(path + ".away", path)
    assert w.store.read_envelope(qid).recipients[0].state == TODO
    assert any("cannot record delivery results" in l for l in text_of(events))


@pytest.mark.parametrize("read_back", [False, True])
def test_a_new_message_reusing_the_id_of_one_still_finishing_is_not_lost(tmp_path, read_back):
    """Queue ids are inode numbers: the id of a message whose file was just unlinked can
    come back for a new message before the manager has forgotten the old one."""
    w = World(tmp_path)
    qid = QueueStore(tmp_path / "queue").inject(b"new\n", "a@example.org", ["test@test.com"],
                                                trigger=False)
    # the old message with this id: finished, its file gone, not yet forgotten
    old = Envelope(sender="x@example.org", recipients=[Recipient(0, "old@test.com", DELIVERED)],
                   birth=EPOCH, token="older message", qid=qid)
    w.manager.jobs[qid] = qm.Job(old, {})
    if read_back:
        w.manager.notify(qid)
    else:
        w.manager.notify_envelope(w.store.read_envelope(qid))
    assert w.local.calls == []                  # not mixed up with the old one
    w.manager._forget(qid)                      # the old one is done
    assert w.local.calls == [(qid, "test@test.com")]
    assert w.store.list_ids() == []


@pytest.mark.parametrize("text,expected", [
    ("did 1+0+0/", "did_1+0+0/"),
    ("two\nlines here", "two/lines_here"),
    ("bell\x07 and \xe9", "bell?_and_?"),
])
def test_logsafe(text, expected):
    assert qm.logsafe(text) == expected


def test_schedule_next_attempt_matches_manager_use():
    assert schedule.next_attempt(EPOCH, EPOCH, REMOTE, 7 * 86400) == EPOCH + 400


def test_when_loaded_fires_after_the_first_scan_has_picked_up_the_old_queue(tmp_path):
    """Readiness (ready.json, READY=1) waits for this: the queue left by the last run is
    picked up before the server says it is ready."""
    w = World(tmp_path)
    w.local.hold = True
    w.inject("a@example.org", ["r1@test.com"])
    w.local.calls.clear()
    w.local.held.clear()
    # A new manager whose thread pool has not run the scan yet.
    w.manager.running = False
    pool = DeferredThreadPoolForLoad()
    w.manager = qm.QueueManager(w.store, local=w.local, remote=w.remote, injector=w.injector,
                                reactor=w.reactor, threadpool=pool, classify=classify,
                                postmaster="postmaster@test.com", hostname="mail.test.com",
                                use_trigger=False)
    loaded = []
    w.manager.when_loaded().addCallback(loaded.append)
    w.manager.startService()
    assert loaded == [] and w.local.calls == []
    pool.run_all()
    assert loaded == [None]
    assert [a for _q, a in w.local.calls] == ["r1@test.com"], "picked up before ready"
    later = []
    w.manager.when_loaded().addCallback(later.append)
    assert later == [None]


class DeferredThreadPoolForLoad(ImmediateThreadPool):
    """Holds calls until run_all(), so the test sees the state before the first scan."""

    def __init__(self):
        super().__init__()
        self.pending = []
        self.holding = True

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        if self.holding:
            self.pending.append((onResult, func, args, kw))
            return
        return super().callInThreadWithCallback(onResult, func, *args, **kw)

    def run_all(self):
        self.holding = False
        while self.pending:
            onResult, func, args, kw = self.pending.pop(0)
            super().callInThreadWithCallback(onResult, func, *args, **kw)


def test_a_finished_delivery_frees_its_slot_before_the_bookkeeping(tmp_path):
    """qmail-send counts running deliveries, not its own writes: with concurrency_local 1,
    the second message starts while the first one's removal is still on its way to disk."""
    from mailappliance.testing.threads import DeferredThreadPool
    w = World(tmp_path, concurrency_local=1)
    w.local.hold = True
    q1 = w.inject("a@example.org", ["test@test.com"])
    q2 = w.inject("a@example.org", ["test@test.com"])
    assert [qid for qid, _ in w.local.calls] == [q1]
    slow = DeferredThreadPool()
    w.manager.threadpool = slow
    w.local.held.pop(0).callback(success("did 1+0+0/"))
    assert w.manager.busy[LOCAL] == 1, "the slot went straight to the next message"
    assert [qid for qid, _ in w.local.calls] == [q1, q2]
    assert q1 in w.store.list_ids(), "its removal is still pending"
    slow.run_all()
    assert q1 not in w.store.list_ids()
    w.local.held.pop(0).callback(success("did 1+0+0/"))
    slow.run_all()
    assert w.store.list_ids() == [] and w.manager.busy[LOCAL] == 0


def test_kept_message_bytes_serve_the_first_deliveries_and_are_then_released(tmp_path):
    seen = []

    class Reading(FakeLocalDeliverer):
        def deliver(self, env, index, messages):
            seen.append((env.data is not None, messages.read_message(env)))
            return super().deliver(env, index, messages)

    w = World(tmp_path, start=False)
    w.local = Reading()
    w.manager.local = w.local
    w.manager.startService()
    w.local.hold = True
    qid = w.inject("a@example.org", ["test@test.com", "far@remote.example"],
                   body=b"Subject: kept\n\nbody\n")
    assert seen == [(True, b"Subject: kept\n\nbody\n")]
    assert w.store.kept_bytes == len(b"Subject: kept\n\nbody\n")   # remote still to go
    w.local.held[0].callback(success("did 1+0+0/"))
    assert w.store.kept_bytes == 0 and w.store.list_ids() == []
    assert w.remote.calls == [(qid, ["far@remote.example"])]


def test_each_delivery_is_handed_the_store_as_its_message_source(tmp_path):
    w = World(tmp_path)
    w.inject("a@example.org", ["test@test.com", "far@remote.example"])
    assert w.local.sources == [w.store] and w.remote.sources == [w.store]
    assert IMessageSource.providedBy(w.store)


def test_a_deferred_message_does_not_keep_its_bytes_in_memory(tmp_path):
    w = World(tmp_path)
    w.local.script["test@test.com"] = deferral("mailbox busy")
    qid = w.inject("a@example.org", ["test@test.com"])
    assert w.store.list_ids() == [qid]
    assert w.store.kept_bytes == 0
    # due in 100 s, beyond the window's horizon: it waits as a backlog entry, not in memory
    assert qid not in w.manager.jobs and w.manager.status()["backlog"] == 1


# -- the active window and the backlog (issue 19) -------------------------------------------

def refused(dest="dead.example"):
    return deferral("Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
                    f"127.0.0.1:25 (mx.{dest}): Connection refused", unreachable=True)


def down(result):
    return result.unreachable


def test_the_window_never_holds_more_than_its_limit_and_every_message_still_goes(tmp_path):
    w = World(tmp_path, active_limit=5, concurrency_local=2)
    w.local.hold = True
    peak = 0
    qids = [w.inject("a@example.org", [f"u{i}@test.com"]) for i in range(30)]
    for _ in range(100):
        peak = max(peak, len(w.manager.jobs) + len(w.manager.picking))
        if not w.local.held:
            break
        w.local.held.pop(0).callback(success("did 1+0+0/"))
    assert peak <= 5
    assert sorted(q for q, _a in w.local.calls) == sorted(qids)
    assert w.store.list_ids() == [] and len(w.manager.backlog) == 0


def test_a_restart_loads_a_deferred_queue_into_the_backlog_not_into_memory(tmp_path):
    w = World(tmp_path, active_limit=4)
    for i in range(12):
        w.remote.script[f"b{i}@far.example"] = deferral("451 try later")
    qids = [w.inject("a@test.com", [f"b{i}@far.example"]) for i in range(12)]
    births = {q: w.store.read_envelope(q).birth for q in qids}
    assert len(w.manager.jobs) == 0 and len(w.manager.backlog) == 12
    w.remote.calls.clear()
    w.advance(30)
    w.restart(active_limit=4)
    st = w.manager.status()
    assert (st["active"], st["backlog"], st["messages"], st["loading"]) == (0, 12, 12, False)
    assert w.manager.oldest_birth() == min(births.values())
    assert w.remote.calls == []
    # each comes back at its next try (birth + 400), at most four at once in memory
    w.remote.script.clear()
    w.remote.hold = True
    w.advance(max(births.values()) + 400 - w.reactor.seconds())
    assert len(w.manager.jobs) <= 4
    for _ in range(20):
        for d in list(w.remote.held):
            w.remote.held.remove(d)
            d.callback([success("ok")])
    assert w.store.list_ids() == [] and w.manager.oldest_birth() is None


def test_the_load_is_in_batches_and_readiness_waits_for_its_end(tmp_path):
    from mailappliance.testing.threads import DeferredThreadPool
    w = World(tmp_path)
    w.remote.script["b@far.example"] = deferral("451 later")
    for _ in range(3):
        w.inject("a@test.com", ["b@far.example"])
    pool = DeferredThreadPool()
    w.restart(threadpool=pool)
    loaded = []
    w.manager.when_loaded().addCallback(loaded.append)
    assert loaded == [] and len(w.manager.backlog) == 0
    pool.run_all()
    assert loaded == [None] and len(w.manager.backlog) == 3


def test_queue_flush_reaches_the_backlog_and_flush_at_domain_reads_what_it_must(tmp_path):
    w = World(tmp_path)
    w.remote.script["b@x.example"] = deferral("451 later")
    w.remote.script["c@y.example"] = deferral("451 later")
    qx = w.inject("a@test.com", ["b@x.example"])
    qy = w.inject("a@test.com", ["c@y.example", "d@z.example"])   # two domains: unknown dest
    assert len(w.manager.backlog) == 2
    w.restart()
    del w.remote.script["b@x.example"]
    w.remote.calls.clear()
    out = []
    # x.example's message is known by its destination; qy (two domains) is read to see
    w.manager.flush(None, "x.example").addCallback(out.append)
    assert out == [1] and [q for q, _ in w.remote.calls] == [qx]
    w.remote.calls.clear()
    w.manager.flush(None, "y.example").addCallback(out.append)
    assert out == [1, 1]
    assert [q for q, _ in w.remote.calls] == [qy]
    assert w.manager.flush() == 1 and w.store.list_ids() == [qy]


def test_a_message_another_process_commits_is_found_once_beside_a_backlog(tmp_path):
    w = World(tmp_path)
    w.remote.script["b@far.example"] = deferral("451 later")
    w.inject("a@test.com", ["b@far.example"])
    other = QueueStore(tmp_path / "queue")
    qid = other.inject(b"x\n", "a@example.org", ["test@test.com"], trigger=False)
    calls = len(w.remote.calls)
    w.advance(qm.SCAN_INTERVAL)
    w.advance(qm.SCAN_INTERVAL)
    assert w.local.calls == [(qid, "test@test.com")]
    assert len(w.remote.calls) == calls, "the backlog's message is not picked up by the scan"
    assert len(w.manager.backlog) == 1


# -- dead destinations and per-destination concurrency (issues 18 and 19) ------------------------

def test_a_dead_destination_costs_one_attempt_and_its_backlog_drains_when_it_is_back(tmp_path):
    w = World(tmp_path, destination_down=down, concurrency_destination=1)
    w.remote.script.update({f"u{i}@dead.example": refused for i in range(10)})
    with capturedLogs() as events:
        qids = [w.inject("a@test.com", [f"u{i}@dead.example"]) for i in range(10)]
        other = w.inject("a@test.com", ["v@alive.example"])
    tried = [q for q, a in w.remote.calls if a[0].endswith("@dead.example")]
    assert tried == [qids[0]], "one connection attempt for ten messages"
    assert (other, ["v@alive.example"]) in w.remote.calls
    assert w.manager.stats["suspended"] == 9
    lines = text_of(events)
    assert sum(1 for l in lines if "destination dead.example is dead" in l) == 1
    assert sum(1 for l in lines if "deferral: Not_tried:_dead.example" in l) == 9
    assert w.store.list_ids() == sorted(qids)
    # A new message to it while it is dead: deferred at once, not tried either.
    w.inject("a@test.com", ["late@dead.example"])
    assert len([1 for _q, a in w.remote.calls if a[0].endswith("@dead.example")]) == 1
    # Its time is up: one message tries; the destination is back, everything goes now,
    # not at each message's own next try (an hour and more away).
    w.remote.script.clear()
    w.advance(qm.DEAD_RETRY_MIN)
    assert w.store.list_ids() == []
    assert len([1 for _q, a in w.remote.calls if a[0].endswith("@dead.example")]) == 1 + 11


def test_a_dead_destination_that_stays_dead_is_retried_with_a_growing_pause(tmp_path):
    w = World(tmp_path, destination_down=down)
    w.remote.script.update({f"u{i}@dead.example": refused for i in range(3)})
    for i in range(3):
        w.inject("a@test.com", [f"u{i}@dead.example"])
    assert len(w.remote.calls) == 1
    w.advance(qm.DEAD_RETRY_MIN)              # the probe: still dead
    assert len(w.remote.calls) == 2
    w.advance(qm.DEAD_RETRY_MIN)              # not yet: the pause doubled
    assert len(w.remote.calls) == 2
    w.advance(qm.DEAD_RETRY_MIN)
    assert len(w.remote.calls) == 3


def test_a_server_that_answers_4xx_is_not_dead(tmp_path):
    w = World(tmp_path, destination_down=down)
    for i in range(3):
        w.remote.script[f"u{i}@grey.example"] = deferral("451 greylisted, try later")
        w.inject("a@test.com", [f"u{i}@grey.example"])
    assert len(w.remote.calls) == 3 and w.manager.stats["suspended"] == 0


def test_two_hung_destinations_do_not_take_the_remote_slots_of_a_third(tmp_path):
    w = World(tmp_path, concurrency_remote=5, concurrency_destination=2)
    w.remote.hold = True
    for dest in ("slow1.example", "slow2.example"):
        for i in range(6):
            w.inject("a@test.com", [f"u{i}@{dest}"])
    assert len(w.remote.calls) == 4, "two slots each for the slow ones"
    q = w.inject("a@test.com", ["v@fast.example"])
    assert w.remote.calls[-1] == (q, ["v@fast.example"])
    w.remote.held[-1].callback([success("ok")])
    assert q not in w.store.list_ids()
    assert w.manager.status()["remote_busy"] == 4


def test_destinations_take_turns(tmp_path):
    """Round robin among destinations: one that arrives behind another's long line does not
    wait for the whole line."""
    w = World(tmp_path, concurrency_remote=1)
    w.remote.hold = True
    for i in range(5):
        w.inject("a@test.com", [f"u{i}@a.example"])
    w.inject("a@test.com", ["v@b.example"])
    for _ in range(5):
        w.remote.held.pop(0).callback([success("ok")])
    order = [a[0].split("@")[1] for _q, a in w.remote.calls]
    assert order == ["a.example", "a.example", "b.example", "a.example", "a.example",
                     "a.example"]


def test_a_full_window_with_due_backlog_waits_without_spinning(tmp_path):
    """Backlog messages come due while the window is full of messages in delivery: no timer
    may fire over and over (a test clock would never return); the first message to finish
    lets the next ones in."""
    w = World(tmp_path, active_limit=2, concurrency_remote=2, concurrency_destination=2)
    for i in range(3):
        w.remote.script[f"d{i}@later.example"] = deferral("451 later")
        w.inject("a@test.com", [f"d{i}@later.example"])
    assert len(w.manager.backlog) == 3 and not w.manager.jobs
    w.remote.hold = True
    for i in range(2):
        w.inject("a@test.com", [f"u{i}@far.example"])
    assert len(w.manager.jobs) == 2
    w.remote.script.clear()
    w.advance(500)                    # the three are due; the window is still full
    assert len(w.remote.held) == 2 and len(w.manager.backlog) == 3
    while w.remote.held:
        w.remote.held.pop(0).callback([success("ok")])
    assert w.store.list_ids() == []


def test_readiness_does_not_wait_longer_than_load_ready_wait_for_a_long_load(tmp_path):
    """A million messages on a cold disk load for minutes; systemd would kill a Type=notify
    service not ready within its TimeoutStartSec.  Ready after LOAD_READY_WAIT, the load
    going on in the background."""
    from mailappliance.testing.threads import DeferredThreadPool
    w = World(tmp_path)
    w.remote.script["b@far.example"] = deferral("451 later")
    w.inject("a@test.com", ["b@far.example"])
    pool = DeferredThreadPool()
    with capturedLogs() as events:
        w.restart(threadpool=pool)
        loaded = []
        w.manager.when_loaded().addCallback(loaded.append)
        w.advance(qm.LOAD_READY_WAIT - 1)
        assert loaded == []
        w.advance(1)
        assert loaded == [None] and w.manager.status()["loading"]
    assert any("queue still loading after" in l for l in text_of(events))
    later = []
    w.manager.when_loaded().addCallback(later.append)
    assert later == [None]
    pool.run_all()
    assert not w.manager.status()["loading"] and len(w.manager.backlog) == 1


def test_the_load_runs_several_batches_at_once_and_knows_each_message_once(tmp_path):
    from mailappliance.testing.threads import DeferredThreadPool
    w = World(tmp_path)
    for i in range(10):
        w.remote.script[f"b{i}@far.example"] = deferral("451 later")
        w.inject("a@test.com", [f"b{i}@far.example"])
    pool = DeferredThreadPool()
    w.restart(threadpool=pool, load_batch=3)
    loading = [c for c in pool.pending if getattr(c[1], "__name__", "") == "_load_batch"]
    assert len(loading) == qm.LOAD_PARALLEL, "three batches in flight at once"
    pool.run_all()
    assert len(w.manager.backlog) == 10 and not w.manager.status()["loading"]
    assert w.manager.backlog.known(set(w.store.list_ids())) == set(w.store.list_ids())


def test_messages_waiting_for_a_dead_destination_still_bounce_at_the_end_of_their_life(
        tmp_path):
    w = World(tmp_path, lifetime=3600, destination_down=down)
    w.remote.script.update({f"u{i}@dead.example": refused for i in range(3)})
    qids = [w.inject("alice@test.com", [f"u{i}@dead.example"]) for i in range(3)]
    for _ in range(100):
        w.advance(60)
        if not w.store.list_ids():
            break
    assert w.store.list_ids() == []
    assert sorted(a for _q, a in w.local.calls) == ["alice@test.com"] * 3, "three bounces"
    tried = [q for q, a in w.remote.calls if a[0].endswith("@dead.example")]
    # the first attempt and one probe per pause (300, 600, 1200 s ...), not every retry of
    # each message (4 each: at 0, 400, 1600 and 3600 s)
    assert len(tried) <= 5, tried
    assert set(qids) >= set(tried)


def test_removing_a_message_that_waits_in_the_backlog(tmp_path):
    w = World(tmp_path)
    w.remote.script["b@example.org"] = deferral("451 later")
    qid = w.inject("alice@test.com", ["b@example.org"])
    assert w.manager.status()["backlog"] == 1
    out = []
    w.manager.remove(qid).addBoth(out.append)
    assert out == [True] and w.store.list_ids() == []
    assert w.manager.status()["backlog"] == 0 and w.manager.oldest_birth() is None


def test_removals_gather_within_the_window_and_stop_flushes_them(tmp_path):
    """Finished messages wait at most REMOVAL_WINDOW for others to share one pool trip; their
    queue files stay until then (removal comes after delivery, never before). The stop
    starts whatever waits in the window."""
    window = 1 / 128                           # binary fractions: exact sums on the fake clock
    w = World(tmp_path, removal_window=window)
    first = w.inject("a@example.org", ["test@test.com"])
    w.advance(window / 2)
    second = w.inject("a@example.org", ["test@test.com"])
    assert sorted(w.store.list_ids()) == sorted([first, second])   # both delivered, waiting
    calls = w.pool.calls
    w.advance(window / 2)                      # the first removal's window ends
    assert w.store.list_ids() == [] and w.pool.calls == calls + 1  # one trip for both
    third = w.inject("a@example.org", ["test@test.com"])
    assert w.store.list_ids() == [third]
    w.manager.stopService()
    assert w.store.list_ids() == []
    assert [a for _q, a in w.local.calls] == ["test@test.com"] * 3


def test_with_every_local_slot_taken_the_gathering_window_ends_at_once(tmp_path):
    """The local deliverer's window waits for deliveries that cannot come while all
    concurrency_local slots are taken: the manager ends it then."""
    local = FakeLocalDeliverer()
    local.hold = True
    w = World(tmp_path, local=local, concurrency_local=2)
    w.inject("a@example.org", ["r1@test.com"])
    assert local.flushes == []
    w.inject("a@example.org", ["r2@test.com"])
    assert local.flushes == [2]


class FlaggingPool(ImmediateThreadPool):
    """Runs calls at once, and says whether one is running (as a pool thread would)."""

    def __init__(self):
        super().__init__()
        self.inside = False

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        self.inside = True
        try:
            return super().callInThreadWithCallback(onResult, func, *args, **kw)
        finally:
            self.inside = False


def test_a_bounce_is_read_and_composed_in_the_pool_not_on_the_reactor(tmp_path, monkeypatch):
    """Up to 100 KB of the original, its long lines re-encoded: thread-pool work."""
    w = World(tmp_path, start=False)
    w.pool = w.manager.threadpool = w.injector.threadpool = FlaggingPool()
    where = []
    real = qm.bounce_mod.bounce_message

    def composing(**kw):
        where.append(w.pool.inside)
        return real(**kw)
    monkeypatch.setattr(qm.bounce_mod, "bounce_message", composing)
    w.manager.startService()
    w.local.script["nobody@test.com"] = failure("No mailbox here by that name. (#5.1.1)")
    w.inject("alice@test.com", ["nobody@test.com"],
             body=b"Subject: t\n\n" + b"long " * 400 + b"\n")
    assert where == [True]
    assert w.manager.stats["bounces"] == 1
