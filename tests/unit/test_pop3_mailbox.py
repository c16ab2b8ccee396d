"""The Maildir as qmail-pop3d serves it: order, UIDL, sizes, QUIT semantics, the lock."""

from __future__ import annotations

import os

import pytest

from mailappliance.pop3.mailbox import (
    CUR_SUFFIX, Maildir, MailboxBusy, MailboxError, MessageGone, open_session, uid_for)
from tests.pop3_support import deliver


@pytest.fixture
def md(tmp_path):
    path = tmp_path / "Maildir"
    for d in ("tmp", "new", "cur"):
        (path / d).mkdir(parents=True)
    return path


def test_lists_new_and_cur_by_delivery_time(md):
    t = 1_700_000_000
    c = deliver(md, b"third\n", mtime=t + 30, sub="new")
    a = deliver(md, b"first\n", mtime=t + 10, sub="cur", name=f"{t}.A.host:2,S")
    b = deliver(md, b"second\n", mtime=t + 20, sub="new")
    (md / "new" / ".hidden").write_bytes(b"x")
    (md / "tmp" / "inflight").write_bytes(b"not yet delivered")
    msgs = Maildir(md).scan()
    assert [m.name for m in msgs] == [f"cur/{a}", f"new/{b}", f"new/{c}"]
    assert [m.uid for m in msgs] == [f"{t}.A.host", b, c]
    assert [m.size for m in msgs] == [6, 7, 6]


def test_uidl_stable_across_quit_move_to_cur(md):
    name = deliver(md, b"x\n")
    box = Maildir(md)
    before = box.scan()
    assert box.update((), before) == 0
    assert not list((md / "new").iterdir())
    assert (md / "cur" / (name + CUR_SUFFIX)).exists()
    after = box.scan()
    assert [m.uid for m in after] == [m.uid for m in before] == [name]


def test_size_from_wire_size_field(md):
    deliver(md, b"a\nb\n", name="1700000000.M1.host,S=4,W=6")
    assert Maildir(md).scan()[0].size == 6


def test_invalid_uid_gets_stable_hash():
    assert uid_for("1700000000.M1P2.host") == "1700000000.M1P2.host"
    long = "x" * 71
    assert uid_for(long) == uid_for(long) and len(uid_for(long)) == 40 and uid_for(long) != long
    assert uid_for("has space") != "has space"
    assert uid_for("caf\u00e9") != "caf\u00e9"


def test_update_deletes_only_marked_and_is_idempotent(md):
    names = [deliver(md, f"m{i}\n".encode(), mtime=1_700_000_000 + i) for i in range(3)]
    box = Maildir(md)
    msgs = box.scan()
    os.unlink(md / msgs[1].name)                 # someone else removed it meanwhile
    assert box.update((msgs[0], msgs[1]), (msgs[2],)) == 0
    assert sorted(os.listdir(md / "cur")) == [names[2] + CUR_SUFFIX]
    assert os.listdir(md / "new") == []


def test_no_change_without_update(md):
    for i in range(3):
        deliver(md, b"x\n", mtime=1_700_000_000 + i)
    before = sorted(os.listdir(md / "new"))
    box, msgs = open_session(md)
    with box.open(msgs[0]) as f:
        assert f.read() == b"x\n"
    box.unlock()                                  # dropped connection: no update
    assert sorted(os.listdir(md / "new")) == before


def test_open_missing_and_symlink(md, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0\n")
    os.symlink(secret, md / "new" / "1700000000.link.host")
    name = deliver(md, b"x\n")
    box = Maildir(md)
    msgs = box.scan()
    assert [m.name for m in msgs] == [f"new/{name}"]      # the symlink is not listed
    os.unlink(md / msgs[0].name)
    with pytest.raises(MessageGone):
        box.open(msgs[0])
    from mailappliance.pop3.mailbox import MessageInfo
    with pytest.raises(MessageGone):
        box.open(MessageInfo("u", 1, "new/1700000000.link.host", 0))


def test_lock_excludes_a_second_session_and_release_frees_it(md):
    box, _ = open_session(md)
    with pytest.raises(MailboxBusy):
        open_session(md)
    box.unlock()
    box2, _ = open_session(md)
    box2.unlock()


def test_missing_maildir_is_an_error(tmp_path):
    with pytest.raises(MailboxError):
        open_session(tmp_path / "nope")
    (tmp_path / "half" / "new").mkdir(parents=True)
    with pytest.raises(MailboxError):
        open_session(tmp_path / "half")
    # The failed open left no lock behind.
    (tmp_path / "half" / "cur").mkdir()
    box, msgs = open_session(tmp_path / "half")
    assert msgs == []
    box.unlock()


def test_ten_thousand_big_messages_list_without_loading_bodies(md):
    """10,000 sparse files of 50 MB each: a scan that read bodies would need gigabytes."""
    import tracemalloc
    big = 50 * 1024 * 1024
    t = 1_700_000_000
    for i in range(10_000):
        with open(md / "new" / f"{t + i}.M{i}.host", "wb") as f:
            f.truncate(big)
    tracemalloc.start()
    try:
        msgs = Maildir(md).scan()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(msgs) == 10_000 and all(m.size == big for m in msgs)
    assert [m.uid for m in msgs[:2]] == [f"{t}.M0.host", f"{t + 1}.M1.host"]
    assert peak < 20 * 1024 * 1024           # the listing itself, a few MB
