"""queue/store.py: what `queue list` reads -- deferral records (defer/<N>), pages of ids, one
entry -- and that removal and cleanup take the defer files with the message."""

import os

from mailappliance.queue import naming
from mailappliance.queue.store import TMP_MAX_AGE, QueueStore

NOW = 1_700_000_000.0


def store(tmp_path):
    return QueueStore(tmp_path / "queue", clock=lambda: NOW)


def test_deferrals_count_attempts_and_keep_the_last_text(tmp_path):
    s = store(tmp_path)
    qid = s.inject(b"Subject: x\n\nbody\n", "a@test.com", ["b@x.org", "c@y.org"], trigger=False)
    env = s.read_envelope(qid)
    assert s.deferrals(env) == {}
    s.record_deferrals(env, [(0, "first\ntry"), (1, "other")], when=NOW + 10)
    s.record_deferrals(env, [(0, "second")], when=NOW + 20)
    assert s.deferrals(env) == {0: (2, NOW + 20, "second"), 1: (1, NOW + 10, "other")}
    entry = s.entry(qid)
    assert entry.name == naming.message_name(qid, env.token)
    assert [(d.address, d.state, d.attempts, d.last_error) for d in entry.details] == [
        ("b@x.org", "todo", 2, "second"), ("c@y.org", "todo", 1, "other")]


def test_a_defer_file_of_an_earlier_message_with_the_same_number_is_ignored(tmp_path):
    s = store(tmp_path)
    qid = s.inject(b"x\n", "a@test.com", ["b@x.org"], trigger=False)
    env = s.read_envelope(qid)
    s.record_deferrals(env, [(0, "old")])
    env.token = "another message"
    assert s.deferrals(env) == {}


def test_removal_and_cleanup_take_the_defer_file(tmp_path):
    s = store(tmp_path)
    qid = s.inject(b"x\n", "a@test.com", ["b@x.org"], trigger=False)
    env = s.read_envelope(qid)
    s.record_deferrals(env, [(0, "t")])
    assert env.bounce_file
    s.remove(qid, env.bounce_file)
    assert os.listdir(s.defer_dir) == []
    orphan = os.path.join(s.defer_dir, "12345")
    open(orphan, "wb").close()
    os.utime(orphan, (NOW - TMP_MAX_AGE - 1,) * 2)
    assert orphan in s.cleanup()
    assert not os.path.exists(orphan)


def test_pages_hold_the_smallest_ids_after_the_given_one_and_count_the_rest(tmp_path):
    s = store(tmp_path)
    ids = sorted(s.inject(b"x\n", "a@test.com", ["b@x.org"], trigger=False) for _ in range(7))
    assert s.page_ids(None, 3) == (ids[:3], 7, 4)
    assert s.page_ids(ids[2], 3) == (ids[3:6], 7, 1)
    assert s.page_ids(ids[5], 3) == (ids[6:], 7, 0)
    entries, total, more = s.entries_page(ids[3], 10)
    assert [e.qid for e in entries] == ids[4:] and (total, more) == (7, 0)
