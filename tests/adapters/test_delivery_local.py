"""delivery/local.py (qmail-local + vdelivermail) with a real user store, queue and Maildirs."""

from __future__ import annotations

import errno
import os

import pytest

from mailappliance.delivery import local as lo
from mailappliance.envelope import DEFERRAL, FAILURE, SUCCESS, Envelope, Recipient
from mailappliance.fileops import FileOps
from mailappliance.queue.inject import Injector
from mailappliance.queue.store import QueueStore
from mailappliance.testing.delivery import MemoryMessageSource
from mailappliance.testing.threads import ImmediateThreadPool, ThreadlessReactor
from mailappliance.users.store import UserStore


class World:
    def __init__(self, tmp_path, maildir_ops=None, injector=None, gather_window=0.0):
        self.reactor = ThreadlessReactor()
        self.reactor.advance(1_700_000_000)
        self.pool = ImmediateThreadPool()
        self.users = UserStore(tmp_path / "data", bcrypt_cost=4)
        self.users.add_domain("test.com")
        self.test = self.users.add_user("test@test.com", "Passw0rd!long")
        self.queue = QueueStore(tmp_path / "data" / "queue", clock=self.reactor.seconds)
        self.injector = injector or Injector(self.queue, self.reactor, self.pool)
        self.local = lo.LocalDeliverer(self.users, self.injector, self.reactor,
                                       self.pool, hostname="mail.test.com",
                                       default_domain="test.com", maildir_ops=maildir_ops,
                                       gather_window=gather_window)

    def run(self, rcpt, body=b"Subject: hi\n\nhello\n", sender="alice@example.org"):
        qid = self.queue.inject(body, sender, [rcpt], trigger=False)
        env = self.queue.read_envelope(qid)
        out = []
        self.local.deliver(env, 0, self.queue).addBoth(out.append)
        assert out, "deliver() did not finish"
        self.queue.remove(qid)
        return out[0]

    def mailbox(self, user):
        new = user.maildir / "new"
        return [(new / n).read_bytes() for n in sorted(os.listdir(new))]


def test_user_delivery_writes_maildir_with_return_path_and_delivered_to(tmp_path):
    w = World(tmp_path)
    r = w.run("Test@TEST.com")
    assert (r.status, r.text) == (SUCCESS, "did 1+0+0/")
    assert w.mailbox(w.test) == [b"Return-Path: <alice@example.org>\n"
                                 b"Delivered-To: test@test.com\nSubject: hi\n\nhello\n"]


def test_large_message_is_streamed_into_the_maildir(tmp_path):
    w = World(tmp_path)
    body = b"Subject: big\n\n" + b"y" * 99 + b"\n"
    body = body + (b"z" * 99 + b"\n") * (lo.READ_WHOLE_MAX // 100 + 10)
    r = w.run("test@test.com", body=body)
    assert r.status == SUCCESS
    [data] = w.mailbox(w.test)
    assert data == b"Return-Path: <alice@example.org>\nDelivered-To: test@test.com\n" + body


def test_unknown_user_is_a_permanent_failure(tmp_path):
    w = World(tmp_path)
    r = w.run("nobody@test.com")
    assert (r.status, r.text) == (FAILURE, "Sorry, no mailbox here by that name. (#5.1.1)")


def test_alias_forwards_by_reinjection_to_all_targets(tmp_path):
    w = World(tmp_path)
    w.users.add_alias("sales@test.com", ["test@test.com", "boss@example.net"])
    r = w.run("sales@test.com", sender="bob@example.org")
    assert r.status == SUCCESS
    [qid] = w.queue.list_ids()
    assert r.text == f"did 0+0+2/qp {qid}/"
    env = w.queue.read_envelope(qid)
    assert env.sender == "bob@example.org"                       # original sender kept
    assert [x.address for x in env.recipients] == ["test@test.com", "boss@example.net"]
    assert w.queue.read_message(env) == (b"Delivered-To: sales@test.com\n"
                                         b"Subject: hi\n\nhello\n")


def test_role_aliases_reach_the_first_user(tmp_path):
    w = World(tmp_path)
    r = w.run("postmaster@test.com")
    assert r.status == SUCCESS
    [qid] = w.queue.list_ids()
    assert [x.address for x in w.queue.read_envelope(qid).recipients] == ["test@test.com"]


def test_postmaster_of_the_host_name_goes_to_the_default_domain(tmp_path):
    w = World(tmp_path)
    r = w.run("postmaster@mail.test.com")
    assert r.status == SUCCESS
    [qid] = w.queue.list_ids()
    assert w.queue.read_message(w.queue.read_envelope(qid)).startswith(
        b"Delivered-To: postmaster@test.com\n")


def test_own_delivered_to_line_is_a_loop(tmp_path):
    w = World(tmp_path)
    r = w.run("test@test.com", body=b"Delivered-To: TEST@test.com\nSubject: x\n\nbody\n")
    assert (r.status, r.text) == (FAILURE, lo.TEXT_LOOP)
    assert w.mailbox(w.test) == []


def test_delivered_to_in_the_body_is_not_a_loop(tmp_path):
    w = World(tmp_path)
    r = w.run("test@test.com", body=b"Subject: x\n\nDelivered-To: test@test.com\n")
    assert r.status == SUCCESS


def test_alias_loop_through_two_aliases_is_caught(tmp_path):
    """a -> b -> a: the second visit of a finds its own Delivered-To line."""
    w = World(tmp_path)
    w.users.add_alias("a@test.com", ["b@test.com"])
    w.users.add_alias("b@test.com", ["a@test.com"])
    r = w.run("a@test.com")
    assert r.status == SUCCESS
    for expected in (SUCCESS, FAILURE):
        [qid] = w.queue.list_ids()
        env = w.queue.read_envelope(qid)
        out = []
        w.local.deliver(env, 0, w.queue).addBoth(out.append)
        w.queue.remove(qid)
        assert out[0].status == expected
    assert out[0].text == lo.TEXT_LOOP
    assert w.queue.list_ids() == []


def test_alias_depth_limit(tmp_path):
    w = World(tmp_path)
    w.users.add_alias("list@test.com", ["test@test.com"])
    hops = b"".join(b"Delivered-To: hop%d@elsewhere.example\n" % i
                    for i in range(lo.MAX_DELIVERED_TO))
    r = w.run("list@test.com", body=hops + b"Subject: x\n\nbody\n")
    assert (r.status, r.text) == (FAILURE, lo.TEXT_TOO_MANY_HOPS)


def test_over_quota_is_a_temporary_failure(tmp_path):
    w = World(tmp_path)
    w.users.set_quota("test@test.com", 100)
    r = w.run("test@test.com", body=b"Subject: big\n\n" + b"x" * 200 + b"\n")
    assert (r.status, r.text) == (DEFERRAL, "Recipient's mailbox is full. (#4.2.2)")


class NoSpace(FileOps):
    def write(self, fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_in_maildir_is_a_deferral(tmp_path):
    w = World(tmp_path, maildir_ops=NoSpace())
    r = w.run("test@test.com")
    assert r.status == DEFERRAL
    assert os.listdir(w.test.maildir / "new") == [] and os.listdir(w.test.maildir / "tmp") == []


def test_forward_that_cannot_be_queued_is_a_deferral(tmp_path):
    w = World(tmp_path)
    w.users.add_alias("sales@test.com", ["test@test.com"])
    w.injector.store = QueueStore(tmp_path / "q2", ops=NoSpace())
    r = w.run("sales@test.com")
    assert r.status == DEFERRAL and "Unable to forward message" in r.text


@pytest.mark.parametrize("header,found", [
    (b"Delivered-To: A@b.c\nX: y\n\nDelivered-To: no@x\n", ["a@b.c"]),
    (b"delivered-to:   x@y  \r\n\r\nbody", ["x@y"]),
    (b"Subject: no header end", []),
])
def test_header_delivered_to_scan(header, found):
    assert lo.header_delivered_to([header[:7], header[7:]]) == found


class CountingOps(FileOps):
    """FileOps that counts fsyncs of files and of directories, and can fail one of them."""

    def __init__(self, fail_dir_of: str | None = None):
        self.fsyncs, self.dir_fsyncs = 0, []
        self.fail_dir_of = fail_dir_of

    def fsync(self, fd):
        self.fsyncs += 1
        return super().fsync(fd)

    def fsync_dir(self, path):
        self.dir_fsyncs.append(str(path))
        if self.fail_dir_of and self.fail_dir_of in str(path):
            raise OSError(errno.EIO, "Input/output error")
        return super().fsync_dir(path)


def _batch_world(tmp_path, ops):
    from mailappliance.testing.threads import DeferredThreadPool
    w = World(tmp_path, maildir_ops=ops)
    w.pool = DeferredThreadPool()
    w.local.threadpool = w.pool
    w.other = w.users.add_user("other@test.com", "Passw0rd!long")
    return w


def _start(w, rcpts):
    results = []
    for i, rcpt in enumerate(rcpts):
        qid = w.queue.inject(b"Subject: %d\n\nbody\n" % i, "a@example.org", [rcpt],
                             trigger=False)
        out = []
        w.local.deliver(w.queue.read_envelope(qid), 0, w.queue).addBoth(out.append)
        results.append(out)
    return results


def test_deliveries_started_together_share_one_pool_trip_and_one_dir_fsync(tmp_path):
    ops = CountingOps()
    w = _batch_world(tmp_path, ops)
    first = _start(w, ["test@test.com"])                 # runs alone: nothing to wait for
    rest = _start(w, ["test@test.com"] * 4 + ["other@test.com", "nobody@test.com"])
    assert len(w.pool.pending) == 1                         # the rest waits for the next trip
    w.pool.run_one()
    assert first[0][0].status == SUCCESS and all(not r for r in rest)
    assert len(w.pool.pending) == 1                         # ... which carries all six
    ops.fsyncs, ops.dir_fsyncs = 0, []
    w.pool.run_one()
    assert [r[0].status for r in rest] == [SUCCESS] * 5 + [FAILURE]
    assert len(w.mailbox(w.test)) == 5 and len(w.mailbox(w.other)) == 1
    assert ops.fsyncs == 5                                # each file, as before
    assert sorted(ops.dir_fsyncs) == sorted([str(w.test.maildir / "new"),
                                             str(w.other.maildir / "new")])
    assert not w.pool.pending


def test_a_failed_dir_fsync_defers_only_that_maildirs_messages(tmp_path):
    ops = CountingOps(fail_dir_of="other@")
    w = _batch_world(tmp_path, ops)
    ops.fail_dir_of = str(tmp_path / "data" / "domains" / "test.com" / "other")
    first = _start(w, ["test@test.com"])
    rest = _start(w, ["test@test.com", "other@test.com", "other@test.com"])
    w.pool.run_all()
    assert first[0][0].status == SUCCESS
    assert [r[0].status for r in rest] == [SUCCESS, DEFERRAL, DEFERRAL]
    assert len(w.mailbox(w.test)) == 2
    assert w.mailbox(w.other) == [], "not known durable: taken back, the retry delivers it"
    assert os.listdir(w.other.maildir / "tmp") == []


def test_quota_counts_messages_of_the_same_batch(tmp_path):
    w = _batch_world(tmp_path, FileOps())
    w.users.set_quota("test@test.com", 200)
    first = _start(w, ["other@test.com"])
    rest = _start(w, ["test@test.com"] * 4)               # about 80 bytes each
    w.pool.run_all()
    assert first[0][0].status == SUCCESS
    statuses = [r[0].status for r in rest]
    assert statuses == [SUCCESS, SUCCESS, DEFERRAL, DEFERRAL], statuses
    assert len(w.mailbox(w.test)) == 2


def test_delivery_reads_the_message_from_the_source_it_is_handed(tmp_path):
    """No queue file behind it: a small message is read whole from the source, a large one
    streamed from readers it opens (header scan, then the Maildir write) and closes."""
    w = World(tmp_path)
    small = b"Subject: s\n\nsmall\n"
    big = b"Subject: b\n\n" + b"z" * (lo.READ_WHOLE_MAX + 10) + b"\n"
    source = MemoryMessageSource({1: small, 2: big})
    out = []
    for qid, body in ((1, small), (2, big)):
        env = Envelope(sender="a@example.org", birth=0.0, token="t",
                       recipients=[Recipient(0, "test@test.com")])
        env.qid, env.size = qid, len(body)
        w.local.deliver(env, 0, source).addBoth(out.append)
    assert [r.status for r in out] == [SUCCESS, SUCCESS], out
    assert sorted(len(m) - m.index(b"Subject:") for m in w.mailbox(w.test)) == \
        [len(small), len(big)]
    assert len(source.opened) == 2 and all(r.closed for r in source.opened)


def test_deliveries_within_the_gathering_window_share_one_trip(tmp_path):
    window = 1 / 128                           # binary fractions: exact sums on the fake clock
    w = World(tmp_path, gather_window=window)
    out = []
    for k in range(2):
        qid = w.queue.inject(b"Subject: %d\n\nhello\n" % k, "a@example.org",
                             ["test@test.com"], trigger=False)
        w.local.deliver(w.queue.read_envelope(qid), 0, w.queue).addBoth(out.append)
        w.reactor.advance(window / 4)
    assert out == [] and w.mailbox(w.test) == []
    calls = w.pool.calls
    w.reactor.advance(window / 2)              # the first delivery's window ends
    assert [(r.status, r.text) for r in out] == [(SUCCESS, "did 1+0+0/")] * 2
    assert w.pool.calls == calls + 1 and len(w.mailbox(w.test)) == 2
    qid = w.queue.inject(b"Subject: 3\n\nhello\n", "a@example.org", ["test@test.com"],
                         trigger=False)
    w.local.deliver(w.queue.read_envelope(qid), 0, w.queue).addBoth(out.append)
    w.local.flush()                            # the queue stops: no wait for the window
    assert len(out) == 3 and len(w.mailbox(w.test)) == 3
