"""FileOps batches (create_many, commit_many, unlink_many): the C helper and the Python path
give the same results, per file, for successes and for each failing step."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from mailappliance import fileops
from mailappliance.fileops import FileOps
from mailappliance.queue import store as qs

_fileops = fileops._native      # the C helper as FileOps binds it (None where it was not built)


def test_the_c_helper_is_built_in_ci():
    # Outside CI a machine without a C compiler runs the Python path only (same results);
    # CI installs gcc, so there the helper must exist and both paths are tested below.
    if os.environ.get("CI") == "true":
        assert _fileops is not None, \
            "mailappliance_fileops (setup.py, from mailappliance/_fileops.c) was not built"


def test_fileops_binds_the_c_helper_wherever_it_is_built():
    try:
        import mailappliance_fileops as built
    except ImportError:         # pragma: no cover - CI builds it
        built = None
    assert _fileops is built


PATHS = ["native", "python"]


@pytest.fixture(params=PATHS)
def ops(request, monkeypatch):
    if request.param == "native":
        if _fileops is None:
            pytest.skip("C helper not built here (CI requires it)")
        monkeypatch.setattr(fileops, "NATIVE_BATCHES", True)
    else:
        monkeypatch.setattr(fileops, "NATIVE_BATCHES", False)
    o = FileOps()
    assert o._native_for("open_excl") is (request.param == "native")
    return o


def test_create_many_opens_exclusively_and_reports_inode_numbers(tmp_path, ops):
    (tmp_path / "taken").write_bytes(b"old")
    paths = [str(tmp_path / "a"), str(tmp_path / "taken"), str(tmp_path / "nodir" / "b"),
             str(tmp_path / "c")]
    out = ops.create_many(paths)
    a, taken, nodir, c = out
    assert isinstance(taken, FileExistsError) and taken.errno == errno.EEXIST
    assert isinstance(nodir, FileNotFoundError) and nodir.filename == paths[2]
    for (fd, ino), path in ((a, paths[0]), (c, paths[3])):
        st = os.fstat(fd)
        assert st.st_ino == ino == os.stat(path).st_ino
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert os.get_inheritable(fd) is False
        os.close(fd)
    assert (tmp_path / "taken").read_bytes() == b"old"      # never truncated


def test_commit_many_writes_syncs_closes_renames_and_syncs_dirs(tmp_path, ops):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "new").mkdir()
    names = ["one", "two", "three"]
    created = ops.create_many([str(tmp_path / "tmp" / n) for n in names])
    # one file gets part of its bytes before the batch (a streamed message), one gets none
    os.write(created[1][0], b"streamed ")
    items = [(created[0][0], b"first\n" * 1000, str(tmp_path / "tmp" / "one"),
              str(tmp_path / "new" / "one")),
             (created[1][0], memoryview(b"rest\n"), str(tmp_path / "tmp" / "two"),
              str(tmp_path / "new" / "two")),
             (created[2][0], None, str(tmp_path / "tmp" / "three"),
              str(tmp_path / "new" / "three"))]
    errs, derrs = ops.commit_many(items, [str(tmp_path / "new")])
    assert errs == [None, None, None] and derrs == [None]
    assert sorted(os.listdir(tmp_path / "new")) == ["one", "three", "two"]
    assert os.listdir(tmp_path / "tmp") == []
    assert (tmp_path / "new" / "one").read_bytes() == b"first\n" * 1000
    assert (tmp_path / "new" / "two").read_bytes() == b"streamed rest\n"
    assert (tmp_path / "new" / "three").read_bytes() == b""
    for fd, _ino in created:                                # every fd was closed
        with pytest.raises(OSError) as e:
            os.fstat(fd)
        assert e.value.errno == errno.EBADF


def test_commit_many_reports_the_failing_step_per_item_and_goes_on(tmp_path, ops):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "new").mkdir()
    good = ops.create_many([str(tmp_path / "tmp" / "good")])[0][0]
    ro_path = tmp_path / "tmp" / "ro"
    ro_path.write_bytes(b"")
    read_only = os.open(ro_path, os.O_RDONLY)                # write fails: EBADF
    moved = ops.create_many([str(tmp_path / "tmp" / "moved")])[0][0]
    items = [(read_only, b"data", None, None),
             (good, b"ok", str(tmp_path / "tmp" / "good"), str(tmp_path / "new" / "good")),
             (moved, b"x", str(tmp_path / "tmp" / "moved"),
              str(tmp_path / "gone" / "moved"))]              # rename fails: ENOENT
    errs, derrs = ops.commit_many(items, [str(tmp_path / "new"), str(tmp_path / "missing")])
    step, e = errs[0]
    assert step == "write" and e.errno == errno.EBADF
    os.fstat(read_only)                                      # still open after a failed write
    os.close(read_only)
    assert errs[1] is None
    step, e = errs[2]
    assert step == "rename" and isinstance(e, FileNotFoundError)
    with pytest.raises(OSError):
        os.fstat(moved)                                      # closed before the rename
    assert derrs[0] is None and isinstance(derrs[1], FileNotFoundError)
    assert (tmp_path / "new" / "good").read_bytes() == b"ok"
    assert (tmp_path / "tmp" / "moved").read_bytes() == b"x"  # left for the caller to discard


def test_commit_many_fsync_failure_leaves_the_fd_open(tmp_path, ops):
    r, w = os.pipe()                                        # fsync on a pipe: EINVAL
    try:
        errs, derrs = ops.commit_many([(w, None, None, None)], [])
        step, e = errs[0]
        assert step == "fsync" and e.errno == errno.EINVAL
        os.fstat(w)
        assert derrs == []
    finally:
        os.close(r)
        os.close(w)


def test_commit_many_fsyncs_a_held_directory_by_its_descriptor(tmp_path, ops):
    ops.hold_dir(str(tmp_path))
    fd = ops.create_many([str(tmp_path / "f")])[0][0]
    errs, derrs = ops.commit_many([(fd, b"x", None, None)], [str(tmp_path)])
    assert errs == [None] and derrs == [None]


def test_unlink_many_reports_each_path(tmp_path, ops):
    (tmp_path / "a").write_bytes(b"")
    (tmp_path / "d").mkdir()
    out = ops.unlink_many([str(tmp_path / "a"), str(tmp_path / "missing"),
                           str(tmp_path / "d")])
    assert out[0] is None
    assert isinstance(out[1], FileNotFoundError)
    assert isinstance(out[2], OSError) and out[2].errno in (errno.EISDIR, errno.EPERM)
    assert os.listdir(tmp_path) == ["d"]


def test_a_subclass_overriding_a_call_always_gets_the_python_path(tmp_path):
    calls = []

    class Failing(FileOps):
        def fsync(self, fd):
            calls.append(fd)
            raise OSError(errno.EIO, "injected")

    ops = Failing()
    assert not ops._native_for("write", "start_writeback", "fsync", "close", "rename",
                               "fsync_dir")
    assert ops._native_for("unlink") is (_fileops is not None)   # not overridden
    fd = ops.create_many([str(tmp_path / "f")])[0][0]
    errs, _ = ops.commit_many([(fd, b"x", None, None)], [])
    assert calls == [fd] and errs[0][0] == "fsync" and errs[0][1].errno == errno.EIO
    os.close(fd)


@pytest.mark.skipif(_fileops is None, reason="C helper not built here (CI requires it)")
def test_the_c_helper_rejects_malformed_arguments_without_leaking():
    with pytest.raises(TypeError):
        _fileops.commit([(1, b"x")], [])                    # item of the wrong shape
    with pytest.raises(ValueError):
        _fileops.commit([(1, b"x", "a", None)], [])          # src without dst
    with pytest.raises(TypeError):
        _fileops.unlink_many([1.5])
    with pytest.raises(TypeError):
        _fileops.create_files(None)
    with pytest.raises(ValueError):
        _fileops.commit([], [-1])


def _store(tmp_path, ops):
    return qs.QueueStore(tmp_path / "queue", clock=lambda: 1_700_000_000.0, ops=ops)


def test_queue_group_commit_fails_one_message_alone_and_leaves_nothing_of_it(tmp_path, ops):
    store = _store(tmp_path, ops)
    tmps = store.begin_many(3)
    assert all(isinstance(t, qs.TmpMessage) and t.ino for t in tmps)
    for k, t in enumerate(tmps):
        t.finish("a@x.test", [f"r{k}@y.test"], data=b"Subject: %d\n\nbody\n" % k, write=False)
    bad = tmps[1]
    os.close(bad.fd)
    bad.fd = os.open(bad.path, os.O_RDONLY)          # its write will fail (EBADF)
    out = store.complete_many(tmps)
    assert isinstance(out[1], qs.QueueWriteError)
    assert out[0] == tmps[0].ino and out[2] == tmps[2].ino
    assert sorted(os.listdir(store.mess_dir)) == sorted([str(out[0]), str(out[2])])
    assert store.tmp_files() == []                  # the failed one's tmp/ file is gone
    for k in (0, 2):
        env = store.read_envelope(out[k])
        assert [r.address for r in env.recipients] == [f"r{k}@y.test"]
        assert store.read_message(env) == b"Subject: %d\n\nbody\n" % k
    store.remove_many([(out[0], False), (out[2], True)])   # a bounce file that is not there
    assert os.listdir(store.mess_dir) == []


def test_maildir_batch_recreates_a_missing_maildir_and_delivers_every_message(tmp_path, ops):
    from mailappliance.delivery import maildir as md
    boxes = [tmp_path / "a" / "Maildir", tmp_path / "b" / "Maildir"]
    md.make_dirs(str(boxes[0]))                      # b's Maildir does not exist yet
    ps = [md.prepare(str(box), return_path="s@x.test", delivered_to=f"{n}@y.test",
                     hostname="mx.test", now=1_700_000_000.5, data=b"Subject: hi\n\nbody\n")
          for n, box in (("a", boxes[0]), ("b", boxes[1]), ("a2", boxes[0]))]
    md.create_many(ps, ops)
    md.finish_many(ps, ops)
    assert [p.error for p in ps] == [None, None, None]
    for p in ps:
        data = (Path(p.maildir) / "new" / p.final).read_bytes()
        assert data.startswith(b"Return-Path: <s@x.test>\nDelivered-To: ")
        assert data.endswith(b"Subject: hi\n\nbody\n")
        assert f",S={len(data)}," in p.final
        assert os.listdir(Path(p.maildir) / "tmp") == []


def test_a_commit_call_that_raises_fails_the_whole_batch_and_claims_nothing(tmp_path):
    class Broken(FileOps):
        def commit_many(self, items, dirs):
            raise MemoryError("no memory for the results")

    store = _store(tmp_path, Broken())
    tmps = store.begin_many(2)
    for t in tmps:
        t.finish("a@x.test", ["b@y.test"], data=b"x\n", write=False)
    out = store.complete_many(tmps)
    assert all(isinstance(r, qs.QueueWriteError) for r in out)
    assert store.tmp_files() == []
    for t in tmps:                      # descriptors are not closed twice (maybe reused)
        os.close(t.fd)


def test_a_maildir_commit_call_that_raises_delivers_nothing_and_claims_nothing(tmp_path):
    from mailappliance.delivery import maildir as md

    class Broken(FileOps):
        def commit_many(self, items, dirs):
            raise MemoryError("no memory for the results")

    box = tmp_path / "Maildir"
    md.make_dirs(str(box))
    p = md.prepare(str(box), return_path="s@x.test", delivered_to="u@y.test",
                   hostname="mx.test", now=1_700_000_000.5, data=b"body\n")
    md.create_many([p], Broken())
    fd = p.fd
    md.finish_many([p], Broken())
    assert p.final is None and p.error is not None and p.error.temporary
    assert os.listdir(box / "tmp") == [] and os.listdir(box / "new") == []
    os.close(fd)                        # left open rather than closed twice


# --- recycling: open_existing, truncate, rename_many, and the queue's free/ files --------------

def test_open_existing_truncate_and_rename_many(tmp_path, ops):
    old = tmp_path / "old"
    old.write_bytes(b"x" * 10000)
    [(fd, ino), missing] = ops.create_many([str(old), str(tmp_path / "none")], create=False)
    assert isinstance(missing, FileNotFoundError)
    assert ino == old.stat().st_ino
    assert (tmp_path / "none").exists() is False            # nothing created
    dst = tmp_path / "new"
    errs, derrs = ops.commit_many([(fd, b"short", str(old), str(dst), 5)], [str(tmp_path)])
    assert errs == [None] and derrs == [None]
    assert dst.read_bytes() == b"short" and not old.exists()  # truncated, then renamed
    (tmp_path / "a").write_bytes(b"a")
    out = ops.rename_many([str(tmp_path / "a"), str(tmp_path / "gone")],
                          [str(tmp_path / "b"), str(tmp_path / "c")])
    assert out[0] is None and isinstance(out[1], FileNotFoundError)
    assert (tmp_path / "b").read_bytes() == b"a"


def _recycling_store(tmp_path, ops):
    return qs.QueueStore(tmp_path / "queue", clock=lambda: 1_700_000_000.0, ops=ops,
                         recycle=True)


def _commit(store, data: bytes, rcpt: str = "b@y.test") -> int:
    [tmp] = store.begin_many(1)
    tmp.finish("a@x.test", [rcpt], data=data, write=False)
    [qid] = store.complete_many([tmp])
    assert isinstance(qid, int), qid
    return qid


def test_a_finished_message_file_is_reused_in_place_and_reads_back_exactly(tmp_path, ops):
    store = _recycling_store(tmp_path, ops)
    big = b"Subject: big\n\n" + b"y" * 20000 + b"\n"
    qid = _commit(store, big, "first@y.test")
    store.remove_many([(qid, True, len(big))])
    assert os.listdir(store.mess_dir) == [] and os.listdir(store.free_dir) == [str(qid)]
    small = b"Subject: small\n\nbody\n"
    qid2 = _commit(store, small, "second@y.test")
    assert qid2 == qid                        # the same inode, overwritten in place
    assert os.listdir(store.free_dir) == [] and store.tmp_files() == []
    env = store.read_envelope(qid2)
    assert [r.address for r in env.recipients] == ["second@y.test"]
    assert store.read_message(env) == small
    # nothing of the longer message is left behind the new trailer
    assert os.stat(store.message_path(qid2)).st_size < len(big)
    # the sendmail command's one-call path reuses too, and truncates as well
    store.remove_many([(qid2, True, len(small))])
    qid3 = store.inject(b"z\n", "a@x.test", ["c@y.test"], trigger=False)
    assert qid3 == qid and store.read_message(store.read_envelope(qid3)) == b"z\n"


def test_large_messages_and_a_full_free_list_are_unlinked(tmp_path, ops, monkeypatch):
    monkeypatch.setattr(qs, "FREE_MAX", 2)
    store = _recycling_store(tmp_path, ops)
    qids = [_commit(store, b"m%d\n" % k) for k in range(4)]
    store.remove_many([(qids[0], False, qs.RECYCLE_MAX + 1),    # too large
                       (qids[1], False, None),                   # size unknown
                       (qids[2], False, 10), (qids[3], False, 10)])
    assert sorted(os.listdir(store.free_dir)) == sorted([str(qids[2]), str(qids[3])])
    assert os.listdir(store.mess_dir) == []
    qid = _commit(store, b"more\n")
    store.remove_many([(qid, False, 10)])        # room again after one was reused
    assert store.free_count() == 2


def test_free_files_are_taken_back_at_start_within_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(qs, "FREE_MAX", 2)
    free = tmp_path / "queue" / "free"
    free.mkdir(parents=True)
    for name in ("11", "12", "13", "junk"):
        (free / name).write_bytes(b"old")
    store = _recycling_store(tmp_path, FileOps())
    assert store.free_count() == 2 and sorted(os.listdir(free)) == ["11", "12"]


def test_a_free_file_that_vanished_is_replaced_by_a_new_one(tmp_path, ops):
    store = _recycling_store(tmp_path, ops)
    qid = _commit(store, b"x\n")
    store.remove_many([(qid, False, 2)])
    os.unlink(os.path.join(store.free_dir, str(qid)))
    qid2 = _commit(store, b"y\n")
    assert store.read_message(store.read_envelope(qid2)) == b"y\n"


def test_a_failed_truncate_fails_that_message_and_leaves_nothing(tmp_path):
    class NoTruncate(FileOps):
        def truncate(self, fd, size):
            raise OSError(errno.EIO, "I/O error")

    store = _recycling_store(tmp_path, NoTruncate())
    qid = _commit(store, b"x" * 100 + b"\n")
    store.remove_many([(qid, False, 101)])
    [tmp] = store.begin_many(1)
    tmp.finish("a@x.test", ["b@y.test"], data=b"y\n", write=False)
    [out] = store.complete_many([tmp])
    assert isinstance(out, qs.QueueWriteError)
    assert os.listdir(store.mess_dir) == [] and os.listdir(store.free_dir) == []


def test_stores_that_do_not_recycle_never_touch_free(tmp_path, ops):
    server = _recycling_store(tmp_path, ops)
    qid = _commit(server, b"x\n")
    server.remove_many([(qid, False, 2)])
    other = qs.QueueStore(tmp_path / "queue", ops=ops)     # the sendmail command's store
    qid2 = other.inject(b"y\n", "a@x.test", ["b@y.test"], trigger=False)
    assert qid2 != qid and os.listdir(other.free_dir) == [str(qid)]
    other.remove_many([(qid2, False, 2)])
    assert os.listdir(other.mess_dir) == [] and os.listdir(other.free_dir) == [str(qid)]


def test_a_free_name_that_is_also_a_message_is_never_reused(tmp_path):
    # After a crash without a journal free/ may still list a file that had been taken and
    # renamed into mess/ (only mess/ was fsynced): the message must survive the next start.
    store = _recycling_store(tmp_path, FileOps())
    qid = _commit(store, b"precious\n")
    os.link(store.message_path(qid), os.path.join(store.free_dir, str(qid)))
    again = _recycling_store(tmp_path, FileOps())
    assert again.free_count() == 0 and os.listdir(again.free_dir) == []
    _commit(again, b"next\n")
    assert again.read_message(again.read_envelope(qid)) == b"precious\n"


def test_a_recycled_id_is_reusable_only_after_its_old_side_files_are_gone(tmp_path):
    # Another thread may take the file as soon as it is in the pool: by then the old
    # message's bounce/ and defer/ files must be gone, or the new one could lose its own.
    seen = []

    class Watch(FileOps):
        def unlink_many(self, paths):
            seen.append(store.free_count())
            return super().unlink_many(paths)

    store = _recycling_store(tmp_path, Watch())
    qid = _commit(store, b"x\n")
    bounce = os.path.join(store.bounce_dir, str(qid))
    open(bounce, "wb").close()
    store.remove_many([(qid, True, 2)])
    assert seen == [0] and store.free_count() == 1 and not os.path.exists(bounce)
