"""delivery/maildir.py: the Maildir protocol, quota and failing disks (all temporary)."""

from __future__ import annotations

import errno
import os
import re

import pytest

from mailappliance.delivery import maildir as md
from mailappliance.delivery.maildir import MaildirError, deliver
from mailappliance.fileops import FileOps

NOW = 1_700_000_000.25


def contents(d):
    return sorted(os.listdir(d))


def do(path, message=b"Subject: x\n\nhello\n", **kw):
    args = dict(return_path="alice@example.org", delivered_to="test@test.com",
                hostname="mail.test.com", now=NOW)
    args.update(kw)
    return deliver(path, [message[:5], message[5:]], **args)


def test_delivery_lands_in_new_with_return_path_and_delivered_to(tmp_path):
    box = tmp_path / "Maildir"
    name = do(box)
    assert contents(box / "tmp") == [] and contents(box / "cur") == []
    assert contents(box / "new") == [name]
    data = (box / "new" / name).read_bytes()
    assert data == (b"Return-Path: <alice@example.org>\nDelivered-To: test@test.com\n"
                    b"Subject: x\n\nhello\n")
    m = re.fullmatch(r"1700000000\.M250000P(\d+)Q(\d+)\.mail\.test\.com,S=(\d+),W=(\d+)", name)
    assert m and int(m.group(1)) == os.getpid()
    assert int(m.group(3)) == len(data)
    assert int(m.group(4)) == len(data) + data.count(b"\n")   # CRLF size for POP3


def test_pop3_reader_understands_the_size_in_the_name(tmp_path):
    from mailappliance.pop3.mailbox import size_from_name
    name = do(tmp_path / "M")
    data = (tmp_path / "M" / "new" / name).read_bytes()
    assert size_from_name(name) == len(data.replace(b"\n", b"\r\n"))


def test_names_are_unique(tmp_path):
    names = {do(tmp_path / "M") for _ in range(100)}
    assert len(names) == 100 and len(contents(tmp_path / "M" / "new")) == 100


def test_hostname_slash_and_colon_are_escaped(tmp_path):
    name = do(tmp_path / "M", hostname="a/b:c")
    assert "a\\057b\\072c" in name and "/" not in name and ":" not in name


def test_quota_is_a_temporary_failure_and_writes_nothing(tmp_path):
    box = tmp_path / "M"
    do(box)
    used = md.usage(str(box))
    assert used > 0
    with pytest.raises(MaildirError) as e:
        do(box, quota=used + 10, size_hint=100)
    assert e.value.temporary and e.value.text == md.TEXT_FULL
    assert len(contents(box / "new")) == 1 and contents(box / "tmp") == []
    # under quota it is delivered
    do(box, quota=used * 10, size_hint=100)
    assert len(contents(box / "new")) == 2


def test_usage_counts_new_and_cur(tmp_path):
    box = tmp_path / "M"
    n1 = do(box)
    n2 = do(box)
    os.rename(box / "new" / n2, box / "cur" / (n2 + ":2,S"))
    assert md.usage(str(box)) == 2 * (box / "new" / n1).stat().st_size


class Failing(FileOps):
    def __init__(self, at, err):
        self.at, self.err = at, err

    def _f(self, name):
        if name == self.at:
            raise OSError(self.err, os.strerror(self.err))

    def open_excl(self, path):
        self._f("open")
        return super().open_excl(path)

    def write(self, fd, data):
        self._f("write")
        return super().write(fd, data)

    def fsync(self, fd):
        self._f("fsync")
        return super().fsync(fd)

    def fsync_dir(self, path):
        self._f("fsync_dir")
        return super().fsync_dir(path)

    def rename(self, src, dst):
        self._f("rename")
        return super().rename(src, dst)


@pytest.mark.parametrize("at,err,text", [
    ("write", errno.ENOSPC, md.TEXT_NOSPACE),
    ("write", errno.EDQUOT, md.TEXT_FULL),
    ("open", errno.EROFS, md.TEXT_READONLY),
    ("fsync", errno.EIO, "Unable to write to maildir: input/output error. (#4.3.0)"),
    ("fsync_dir", errno.EIO, "Unable to write to maildir: input/output error. (#4.3.0)"),
    ("rename", errno.ENOSPC, md.TEXT_NOSPACE),
])
def test_disk_errors_are_temporary_and_leave_no_partial_file(tmp_path, at, err, text):
    box = tmp_path / "M"
    md.make_dirs(str(box))
    with pytest.raises(MaildirError) as e:
        do(box, ops=Failing(at, err))
    assert e.value.temporary
    assert e.value.text == text
    assert contents(box / "new") == [] and contents(box / "tmp") == []


def test_missing_maildir_is_created(tmp_path):
    box = tmp_path / "domains" / "test.com" / "test" / "Maildir"
    do(box)
    assert len(contents(box / "new")) == 1


def test_maildir_parts_removed_meanwhile_are_created_again(tmp_path):
    box = tmp_path / "M"
    do(box)
    for sub in ("new", "cur"):
        for f in (box / sub).iterdir():
            f.unlink()
        (box / sub).rmdir()
    name = do(box)                      # tmp/ is there, new/ is not: the rename recreates it
    assert contents(box / "new") == [name] and contents(box / "tmp") == []
    assert (box / "cur").is_dir()


def test_header_and_small_message_go_in_one_write(tmp_path):
    writes = []

    class Counting(FileOps):
        def write(self, fd, data):
            writes.append(len(data))
            return super().write(fd, data)

    box = tmp_path / "M"
    deliver(box, [b"Subject: x\n\nhello\n"], return_path="a@b", delivered_to="c@d",
            hostname="h", now=NOW, ops=Counting())
    assert len(writes) == 1
    big = b"x" * (md.JOIN_WRITE_MAX + 1)
    writes.clear()
    name = deliver(box, [big, b"\n"], return_path="a@b", delivered_to="c@d", hostname="h",
                   now=NOW, ops=Counting())
    assert len(writes) == 3
    data = (box / "new" / name).read_bytes()
    assert data.endswith(big + b"\n") and data.startswith(b"Return-Path: <a@b>\nDelivered-To: c@d\n")
    assert name.endswith(",S=%d,W=%d" % (len(data), len(data) + data.count(b"\n")))
