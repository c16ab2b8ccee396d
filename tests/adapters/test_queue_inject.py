"""queue/inject.py: the one door, with group commit, driven by thread-pool doubles."""

from __future__ import annotations

import errno
import os

import pytest

from mailappliance.fileops import FileOps
from mailappliance.queue import inject as qi
from mailappliance.queue.inject import Injector, QueueWriteError
from mailappliance.queue.store import QueueStore
from mailappliance.testing.threads import (DeferredThreadPool, ImmediateThreadPool,
                                           ThreadlessReactor)


class CountingOps(FileOps):
    """Counts calls; can fail one operation."""

    def __init__(self, fail: str | None = None, err: int = errno.ENOSPC) -> None:
        self.calls: list[str] = []
        self.fail, self.err = fail, err

    def _hit(self, name):
        self.calls.append(name)
        if name == self.fail:
            raise OSError(self.err, os.strerror(self.err))

    def write(self, fd, data):
        self._hit("write")
        return super().write(fd, data)

    def fsync(self, fd):
        self._hit("fsync")
        return super().fsync(fd)

    def rename(self, src, dst):
        self._hit("rename")
        return super().rename(src, dst)

    def fsync_dir(self, path):
        self._hit("fsync_dir")
        return super().fsync_dir(path)


def make(tmp_path, pool=None, ops=None, on_commit=None):
    store = QueueStore(tmp_path / "queue", ops=ops)
    return store, Injector(store, ThreadlessReactor(), pool or ImmediateThreadPool(),
                           on_commit=on_commit)


def test_commit_fires_with_the_queue_id_after_the_message_is_on_disk(tmp_path):
    committed = []
    store, inj = make(tmp_path, on_commit=committed.append)
    w = inj.begin()
    w.write(b"Subject: x\n\n")
    w.write(b"body\n")
    qid = result(w.commit("a@x", ["b@y"], "helo [127.0.0.1]"))
    env = store.read_envelope(qid)
    assert store.read_message(env) == b"Subject: x\n\nbody\n"
    assert env.received_from == "helo [127.0.0.1]"
    assert committed == [qid]
    assert store.tmp_files() == []


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_envelope_handed_to_the_manager_equals_the_one_on_disk(tmp_path):
    """on_commit_envelope gets what read_envelope would read, status offsets included."""
    handed = []
    store = QueueStore(tmp_path / "queue")
    inj = Injector(store, ThreadlessReactor(), ImmediateThreadPool(),
                   on_commit_envelope=handed.append)
    w = inj.begin()
    w.write(b"x" * (qi.FLUSH_BYTES + 5))        # streamed part
    w.write(b"tail\n")
    qid = result(w.commit("a@x", ["b@y", "c@z"], "peer"))
    [env] = handed
    assert env == store.read_envelope(qid)
    assert [r.offset for r in env.recipients] == \
        [r.offset for r in store.read_envelope(qid).recipients]


def test_inject_convenience(tmp_path):
    store, inj = make(tmp_path)
    qid = result(inj.inject(b"bounce\n", "", ["postmaster@x"]))
    assert store.read_envelope(qid).sender == ""


def test_group_commit_never_fires_before_its_own_rename_is_synced(tmp_path):
    """Messages that end while a batch is in the pool go together in the next one; one
    directory fsync, in the same pool trip, covers every rename of its batch, and no commit
    fires before it."""
    pool = DeferredThreadPool()
    ops = CountingOps()
    store, inj = make(tmp_path, pool=pool, ops=ops)
    fired = {}
    ds = {}
    for name in "ABCD":
        w = inj.begin()
        w.write(name.encode() * 10)
        ds[name] = w.commit("s@x", ["r@y"])
        ds[name].addCallback(lambda qid, n=name: fired.setdefault(n, qid))
    # A's batch is in the pool; B, C, D wait for the next batch; nothing on disk, nothing fired
    assert len(pool.pending) == 1 and not fired and ops.calls == []
    pool.run_one()                       # A: write, fsync, rename, fsync mess/ -> fired
    assert ops.calls == ["write", "fsync", "rename", "fsync_dir"]
    assert set(fired) == {"A"} and len(pool.pending) == 1          # the batch B-D
    pool.run_one()                       # B, C, D: written, fsynced, renamed, one fsync of mess/
    assert ops.calls[4:] == ["write"] * 3 + ["fsync", "rename"] * 3 + ["fsync_dir"]
    assert set(fired) == set("ABCD")
    assert inj.stats["dir_syncs"] == 2 and inj.stats["commits"] == 4
    assert len(set(fired.values())) == 4


def test_large_message_is_streamed_to_disk_before_commit(tmp_path):
    pool = DeferredThreadPool()
    store, inj = make(tmp_path, pool=pool)
    w = inj.begin()
    chunk = b"x" * 1000 + b"\n"
    for _ in range(3 * qi.FLUSH_BYTES // len(chunk)):
        w.write(chunk)
    assert w.pending_bytes < 3 * qi.FLUSH_BYTES  # a flush was handed off
    pool.run_all()
    [tmpname] = store.tmp_files()
    assert os.path.getsize(tmpname) >= qi.FLUSH_BYTES
    assert os.listdir(store.mess_dir) == []      # not visible before commit
    d = w.commit("a@x", ["b@y"])
    pool.run_all()
    pool.run_all()
    qid = result(d)
    env = store.read_envelope(qid)
    assert env.size == w.size
    assert store.read_message(env) == chunk * (3 * qi.FLUSH_BYTES // len(chunk))


def test_abort_removes_the_partial_file(tmp_path):
    store, inj = make(tmp_path)
    w = inj.begin()
    w.write(b"y" * (qi.FLUSH_BYTES + 10))
    assert len(store.tmp_files()) == 1
    w.abort()
    assert store.tmp_files() == [] and os.listdir(store.mess_dir) == []


@pytest.mark.parametrize("fail", ["write", "fsync", "rename", "fsync_dir"])
def test_disk_error_fails_the_commit_and_leaves_nothing_visible(tmp_path, fail):
    committed = []
    store, inj = make(tmp_path, ops=CountingOps(fail=fail), on_commit=committed.append)
    w = inj.begin()
    w.write(b"z" * (2 * qi.FLUSH_BYTES))   # streamed write, then the commit
    f = result(w.commit("a@x", ["b@y"]))
    assert f.check(QueueWriteError), f
    assert store.tmp_files() == [] and os.listdir(store.mess_dir) == []
    assert committed == []


def test_failed_directory_fsync_fails_every_message_of_its_batch(tmp_path):
    pool = DeferredThreadPool()
    ops = CountingOps()
    store, inj = make(tmp_path, pool=pool, ops=ops)
    first = inj.inject(b"m\n", "a@x", ["b@y"])
    ds = [inj.inject(b"m\n", "a@x", ["b@y"]) for _ in range(3)]
    pool.run_one()                       # the first batch commits
    first_qid = result(first)
    assert isinstance(first_qid, int)
    ops.fail = "fsync_dir"
    pool.run_one()                       # the second batch: renamed, but mess/ not synced
    outcomes = [result(d) for d in ds]
    assert all(hasattr(o, "check") and o.check(QueueWriteError) for o in outcomes)
    assert os.listdir(store.mess_dir) == [str(first_qid)]          # withdrawn, all three
    assert inj.stats["write_errors"] == 3 and inj.stats["commits"] == 1


def test_bad_addresses_are_refused_before_any_io(tmp_path):
    store, inj = make(tmp_path)
    w = inj.begin()
    w.write(b"m\n")
    with pytest.raises(ValueError):
        w.commit("a@x", ["evil\r\nRCPT TO:<x@y>"])
    with pytest.raises(ValueError):
        inj.begin().commit("a@x", [])
    assert store.tmp_files() == [] and os.listdir(store.mess_dir) == []


def test_write_after_commit_is_a_programming_error(tmp_path):
    store, inj = make(tmp_path)
    w = inj.begin()
    w.commit("a@x", ["b@y"])
    with pytest.raises(RuntimeError):
        w.write(b"late")


class FailSecondFsync(CountingOps):
    def fsync(self, fd):
        self.calls.append("fsync")
        if self.calls.count("fsync") == 3:         # A is 1; in the batch B, C, D: C is 3
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return FileOps.fsync(self, fd)


def test_a_failure_in_a_batch_of_finishes_is_that_messages_alone(tmp_path):
    pool = DeferredThreadPool()
    store, inj = make(tmp_path, pool=pool, ops=FailSecondFsync())
    outcomes = {}
    for name in "ABCD":
        w = inj.begin()
        w.write(name.encode() * 10 + b"\n")
        w.commit("s@x", ["r@y"]).addBoth(lambda r, n=name: outcomes.setdefault(n, r) and None)
    pool.run_all()
    assert set(outcomes) == set("ABCD")
    assert isinstance(outcomes["C"].value, QueueWriteError)
    good = {n: q for n, q in outcomes.items() if n != "C"}
    assert all(isinstance(q, int) for q in good.values())
    assert sorted(store.list_ids()) == sorted(good.values())
    for n, qid in good.items():
        assert store.read_message(store.read_envelope(qid)) == n.encode() * 10 + b"\n"
    assert store.tmp_files() == [], "the failed message's tmp file is gone too"
