"""queue/store.py: the queue directory's only writer (file format, commit point, failures)."""

from __future__ import annotations

import errno
import os
import socket

import pytest
from hypothesis import given, settings, strategies as st

from mailappliance import envelope as ev
from mailappliance.envelope import (
    DELIVERED, FAILED, TODO, CorruptEntry, Envelope, Recipient, decode_envelope, encode_envelope)
from mailappliance.fileops import FileOps
from mailappliance.queue import store as qs
from mailappliance.queue.store import QueueStore, QueueWriteError


def files(d) -> list[str]:
    return sorted(os.listdir(d))


@pytest.fixture
def store(tmp_path):
    return QueueStore(tmp_path / "queue", clock=lambda: 1_700_000_000.0)


def test_inject_round_trip_message_and_envelope(store):
    qid = store.inject(b"Subject: hi\n\nbody\n", "a@x.test", ["b@y.test", "c@z.test"],
                       "client [127.0.0.1]", trigger=False)
    assert files(store.mess_dir) == [str(qid)]
    assert store.tmp_files() == []
    # qmail's trick: the id is the inode number, unique while the file exists
    assert os.stat(store.message_path(qid)).st_ino == qid
    env = store.read_envelope(qid)
    assert env.sender == "a@x.test"
    assert [r.address for r in env.recipients] == ["b@y.test", "c@z.test"]
    assert [r.state for r in env.recipients] == [TODO, TODO]
    assert env.birth == 1_700_000_000.0
    assert env.received_from == "client [127.0.0.1]"
    assert env.uid == os.getuid()
    assert env.size == len(b"Subject: hi\n\nbody\n")
    assert store.read_message(env) == b"Subject: hi\n\nbody\n"
    assert store.list_ids() == [qid]


def test_null_sender_and_empty_message_are_stored(store):
    qid = store.inject(b"", "", ["b@y.test"], trigger=False)
    env = store.read_envelope(qid)
    assert env.sender == "" and env.size == 0 and store.read_message(env) == b""


def test_ids_are_unique_over_many_injections(store):
    ids = [store.inject(b"x\n", "a@x", ["b@y"], trigger=False) for _ in range(50)]
    assert len(set(ids)) == 50
    assert store.list_ids() == sorted(ids)


def test_crlf_and_nul_inside_fields_cannot_forge_records():
    """A value that looks like further records stays one value."""
    evil = "x\nR T8:evil@me\n\0\r\nS0:\n"
    env = Envelope(sender=evil, recipients=[Recipient(0, "one@x" + evil)], birth=1.0,
                   received_from=evil, token="t")
    back = decode_envelope(encode_envelope(env))
    assert back.sender == evil
    assert back.received_from == evil
    assert [r.address for r in back.recipients] == ["one@x" + evil]


text = st.text(min_size=0, max_size=60)


@settings(max_examples=200, deadline=None)
@given(sender=text, rcpts=st.lists(text, min_size=1, max_size=8),
       received=st.one_of(st.none(), text), birth=st.floats(0, 4e9),
       states=st.lists(st.sampled_from([TODO, DELIVERED, FAILED]), min_size=8, max_size=8))
def test_envelope_codec_round_trips_any_text(sender, rcpts, received, birth, states):
    env = Envelope(sender=sender, birth=birth, received_from=received, token="tok",
                   recipients=[Recipient(i, a, states[i]) for i, a in enumerate(rcpts)])
    raw = encode_envelope(env)
    trailer = ev.make_trailer(0, raw)
    _m, _e, crc = ev.parse_trailer(trailer)
    back = decode_envelope(raw, crc)
    assert (back.sender, back.received_from, back.birth) == (sender, received, birth)
    assert [(r.address, r.state) for r in back.recipients] == \
        [(a, states[i]) for i, a in enumerate(rcpts)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_never_raises_anything_but_corrupt_entry(raw):
    try:
        decode_envelope(raw)
    except CorruptEntry:
        pass


def test_addresses_with_cr_lf_nul_are_refused_at_injection(store):
    for bad in ("a\r\n@x", "a\n@x", "a\0@x"):
        with pytest.raises(ValueError):
            store.inject(b"m\n", "s@x", [bad], trigger=False)
        with pytest.raises(ValueError):
            store.inject(b"m\n", bad, ["r@x"], trigger=False)
    with pytest.raises(ValueError):
        store.inject(b"m\n", "s@x", [], trigger=False)
    assert files(store.mess_dir) == [] and store.tmp_files() == []


def test_truncated_file_is_corrupt(store):
    qid = store.inject(b"hello\n" * 10, "a@x", ["b@y"], trigger=False)
    path = store.message_path(qid)
    size = os.path.getsize(path)
    for cut in (0, 5, size - ev.TRAILER_SIZE, size - 1):
        with open(path, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(CorruptEntry):
            store.read_envelope(qid)


def test_flipped_byte_in_envelope_is_detected_by_checksum(store):
    qid = store.inject(b"hello\n", "a@x", ["bob@y"], trigger=False)
    path = store.message_path(qid)
    raw = bytearray(open(path, "rb").read())
    i = raw.index(b"bob@y")
    raw[i] = ord("c")
    open(path, "wb").write(raw)
    with pytest.raises(CorruptEntry, match="checksum"):
        store.read_envelope(qid)


def test_unknown_state_byte_is_corrupt(store):
    qid = store.inject(b"hello\n", "a@x", ["bob@y"], trigger=False)
    env = store.read_envelope(qid)
    with open(store.message_path(qid), "r+b") as f:
        f.seek(env.recipients[0].offset)
        f.write(b"Z")
    with pytest.raises(CorruptEntry):
        store.read_envelope(qid)


def test_marks_survive_rereading_and_leave_the_message_intact(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y", "r1@y", "r2@y", "r3@y", "r4@y"],
                       trigger=False)
    env = store.read_envelope(qid)
    store.mark(env, [(0, DELIVERED), (2, DELIVERED), (4, DELIVERED)])
    again = store.read_envelope(qid)   # checksum still valid: states are masked
    assert [r.address for r in again.todo] == ["r1@y", "r3@y"]
    assert not again.finished
    assert store.read_message(again) == b"body\n"
    store.mark(again, [(1, DELIVERED), (3, DELIVERED)])
    assert store.read_envelope(qid).finished


def test_failures_are_recorded_before_the_failed_mark(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y", "r1@y"], trigger=False)
    env = store.read_envelope(qid)
    store.add_failure(env, 1, "Sorry, no mailbox here by that name. (#5.1.1)\nsecond line")
    again = store.read_envelope(qid)
    assert [r.state for r in again.recipients] == [TODO, FAILED]
    assert store.failures(again) == {
        1: ("r1@y", "Sorry, no mailbox here by that name. (#5.1.1)\nsecond line")}


def test_stale_bounce_file_of_a_previous_message_with_same_id_is_ignored(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y"], trigger=False)
    env = store.read_envelope(qid)
    # a bounce file left by an earlier message that had the same inode number
    other = Envelope(sender="", recipients=[Recipient(0, "old@y")], birth=0, token="old",
                     qid=qid)
    with open(os.path.join(store.bounce_dir, str(qid)), "wb") as f:
        f.write(ev.encode_bounce_record(other.token, 0, "old@y", "old failure"))
    assert store.failures(env) == {}


def test_torn_last_bounce_record_is_ignored(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y", "r1@y"], trigger=False)
    env = store.read_envelope(qid)
    store.add_failure(env, 0, "first")
    with open(os.path.join(store.bounce_dir, str(qid)), "ab") as f:
        f.write(ev.encode_bounce_record(env.token, 1, "r1@y", "second")[:-7])
    assert store.failures(env) == {0: ("r0@y", "first")}


def test_remove_deletes_message_and_bounce_file(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y"], trigger=False)
    env = store.read_envelope(qid)
    store.add_failure(env, 0, "x")
    store.remove(qid)
    assert files(store.mess_dir) == [] and files(store.bounce_dir) == []


def test_remove_skips_the_bounce_unlink_only_when_told_there_is_none(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y"], trigger=False)
    stale = os.path.join(store.bounce_dir, str(qid))
    with open(stale, "wb") as f:
        f.write(b"a stale record of an older message with this inode\n")
    store.remove(qid, bounce_file=False)
    assert files(store.mess_dir) == [] and files(store.bounce_dir) == [str(qid)]
    store.cleanup(now=2_000_000_000.0)             # an orphan: cleaned up later
    assert files(store.bounce_dir) == []


def test_finish_tells_whether_a_bounce_file_can_exist(store):
    tmp = store.begin()
    tmp.finish("a@x", ["r0@y", "r1@y"], None, data=b"body\n")
    env = tmp.envelope
    assert env.bounce_file is False
    store.add_failure(env, 0, "no such user")
    assert env.bounce_file is True
    assert store.read_envelope(env.qid).bounce_file is True          # unknown: from disk


def test_message_bytes_kept_in_memory_within_a_budget(store, monkeypatch):
    monkeypatch.setattr(qs, "KEEP_DATA_TOTAL", 11)
    envs = []
    for body in (b"12345\n", b"abcd\n", b"xyz\n"):
        tmp = store.begin()
        tmp.finish("a@x", ["r@y"], None, data=body)
        envs.append(tmp.envelope)
        store.keep_data(tmp.envelope)
    assert envs[0].data == b"12345\n" and envs[1].data == b"abcd\n"
    assert envs[2].data is None and store.kept_bytes == 11
    # the kept bytes are what a reader of the file gets; without them the file is read
    assert store.read_message(envs[0]) == b"12345\n"
    os.truncate(store.message_path(envs[0].qid), 0)        # prove the file was not read
    assert store.read_message(envs[0]) == b"12345\n"
    store.release_data(envs[0])
    assert envs[0].data is None and store.kept_bytes == 5
    assert store.read_message(envs[2]) == b"xyz\n"
    store.release_data(envs[2])                              # never kept: nothing to give back
    assert store.kept_bytes == 5


def test_message_written_in_pieces_is_not_kept(store):
    tmp = store.begin()
    tmp.write(b"first part\n")
    tmp.finish("a@x", ["r@y"], None, data=b"second part\n")
    assert tmp.envelope.data is None
    assert store.read_message(tmp.envelope) == b"first part\nsecond part\n"


def test_the_queue_directory_stays_open_for_its_group_fsyncs(store):
    opened = []

    class Counting(FileOps):
        def hold_dir(self, path):
            opened.append(path)
            return super().hold_dir(path)

    s = QueueStore(store.dir, ops=Counting())
    for _ in range(3):
        s.inject(b"body\n", "a@x", ["r@y"], trigger=False)
    assert opened == [s.mess_dir]
    assert len(s.list_ids()) == 3


def test_move_corrupt_keeps_the_bytes(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y"], trigger=False)
    before = open(store.message_path(qid), "rb").read()
    dst = store.move_corrupt(qid)
    assert files(store.mess_dir) == []
    assert open(dst, "rb").read() == before


def test_cleanup_removes_only_tmp_files_older_than_36_hours(store):
    old = store.begin()
    old.write(b"never finished")
    young = store.begin()
    young.write(b"in progress")
    now = 1_700_000_000.0
    os.utime(old.path, (now - qs.TMP_MAX_AGE - 1, now - qs.TMP_MAX_AGE - 1))
    os.utime(young.path, (now - 60, now - 60))
    removed = store.cleanup(now)
    assert removed == [old.path]
    assert store.tmp_files() == [young.path]


def test_next_try_is_kept_as_mtime(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y"], trigger=False)
    store.set_next_try(qid, 1_800_000_000)
    assert store.next_try(qid) == 1_800_000_000


def test_trigger_pokes_a_listening_socket(tmp_path):
    store = QueueStore(tmp_path / "q")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(store.trigger_path)
    s.settimeout(5)
    try:
        qid = store.inject(b"x\n", "a@x", ["b@y"])
        assert s.recv(32) == b"!%d" % qid      # names the message: no directory scan
        store.pull_trigger()
        assert s.recv(32) == b"!"
    finally:
        s.close()


def test_trigger_without_listener_is_harmless(store):
    """Nobody listens on queue/trigger (no server running): the injection still commits."""
    assert not os.path.exists(store.trigger_path)
    store.pull_trigger()
    qid = store.inject(b"x\n", "a@x", ["b@y"])
    assert files(store.mess_dir) == [str(qid)]
    env = store.read_envelope(qid)
    assert (env.sender, [r.address for r in env.recipients]) == ("a@x", ["b@y"])
    assert store.read_message(env) == b"x\n"


def test_entries_lists_messages_for_the_admin(store):
    qid = store.inject(b"body\n", "a@x", ["r0@y", "r1@y"], trigger=False)
    store.mark(store.read_envelope(qid), [(0, DELIVERED)])
    [entry] = store.entries()
    assert entry.qid == qid and entry.sender == "a@x" and entry.size == 5
    assert entry.recipients == [("r0@y", "done"), ("r1@y", "todo")]


# --- a failing disk --------------------------------------------------------------------------

class FailingOps(FileOps):
    """Raise `err` on the n-th call of operation `at` (1-based)."""

    def __init__(self, at: str, err: int = errno.ENOSPC, nth: int = 1) -> None:
        self.at, self.err, self.nth, self.count = at, err, nth, 0

    def _maybe_fail(self, name: str) -> None:
        if name == self.at:
            self.count += 1
            if self.count == self.nth:
                raise OSError(self.err, os.strerror(self.err))

    def open_excl(self, path):
        self._maybe_fail("open")
        return super().open_excl(path)

    def write(self, fd, data):
        self._maybe_fail("write")
        return super().write(fd, data)

    def fsync(self, fd):
        self._maybe_fail("fsync")
        return super().fsync(fd)

    def rename(self, src, dst):
        self._maybe_fail("rename")
        return super().rename(src, dst)

    def fsync_dir(self, path):
        self._maybe_fail("fsync_dir")
        return super().fsync_dir(path)


@pytest.mark.parametrize("at,err,nth", [
    ("open", errno.ENOSPC, 1),
    ("write", errno.ENOSPC, 1),        # first write: the message data
    ("write", errno.ENOSPC, 2),        # second write: envelope + trailer
    ("write", errno.EDQUOT, 1),
    ("fsync", errno.EIO, 1),
    ("rename", errno.EROFS, 1),
    ("fsync_dir", errno.EIO, 1),
])
def test_failing_disk_gives_queue_write_error_and_leaves_nothing_visible(tmp_path, at, err, nth):
    store = QueueStore(tmp_path / "q", ops=FailingOps(at, err, nth))
    with pytest.raises(QueueWriteError):
        # the streaming path: a chunk written early, the rest with the envelope
        tmp = store.begin()
        tmp.write(b"data\n" * 100)
        qid = tmp.finish("a@x", ["b@y"], data=b"tail\n")
        try:
            store.sync()
        except QueueWriteError:
            store._unlink_quietly(store.message_path(qid))
            raise
    assert files(store.mess_dir) == []
    assert store.tmp_files() == []
    if nth == 1:
        # the one-call path of the sendmail command
        store.ops = FailingOps(at, err, 1)
        with pytest.raises(QueueWriteError):
            store.inject(b"data\n" * 100, "a@x", ["b@y"], trigger=False)
        assert files(store.mess_dir) == []
        assert store.tmp_files() == []
        store.ops = FileOps()
    # the disk recovers: the next injection works
    qid = store.inject(b"again\n", "a@x", ["b@y"], trigger=False)
    assert store.read_message(store.read_envelope(qid)) == b"again\n"
