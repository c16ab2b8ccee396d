"""mailappliance.datadir: private modes at creation, the user store's files tightened, the
owner check for --uid, one-line descriptions of OS and SQLite errors."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat

import pytest

from mailappliance import datadir
from mailappliance.users.store import UserStore


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_new_data_directory_is_0700_whatever_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        assert datadir.make_dir(tmp_path / "a" / "var")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a" / "var") == 0o700


def test_an_existing_data_directory_keeps_its_mode(tmp_path):
    (tmp_path / "var").mkdir(mode=0o755)
    os.chmod(tmp_path / "var", 0o755)
    assert not datadir.make_dir(tmp_path / "var")
    assert mode(tmp_path / "var") == 0o755


def test_the_user_store_is_created_private_with_its_wal_and_shm(tmp_path):
    old = os.umask(0o022)
    try:
        store = UserStore(tmp_path / "var", bcrypt_cost=4)
        store.add_domain("test.com")
        for name in datadir.STORE_FILES:
            assert mode(tmp_path / "var" / name) == 0o600, name
        store.close()
    finally:
        os.umask(old)
    assert mode(tmp_path / "var") == 0o700


def test_store_files_others_can_read_are_tightened(tmp_path):
    store = UserStore(tmp_path, bcrypt_cost=4)
    store.close()
    os.chmod(tmp_path / "users.sqlite", 0o644)
    (tmp_path / "users.sqlite-wal").write_bytes(b"")
    os.chmod(tmp_path / "users.sqlite-wal", 0o664)
    changed = datadir.private_store(tmp_path)
    assert sorted(p.name for p in changed) == ["users.sqlite", "users.sqlite-wal"]
    assert mode(tmp_path / "users.sqlite") == 0o600
    assert mode(tmp_path / "users.sqlite-wal") == 0o600
    assert datadir.private_store(tmp_path) == []


def test_tighten_leaves_symlinks_and_directories_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("x")
    os.chmod(target, 0o644)
    (tmp_path / "users.sqlite").symlink_to(target)
    assert datadir.private_store(tmp_path) == []
    assert mode(target) == 0o644


def test_owner_problem(tmp_path):
    me = os.geteuid()
    assert datadir.owner_problem(tmp_path, me) is None
    assert datadir.owner_problem(tmp_path / "missing", me) is None
    line = datadir.owner_problem(tmp_path, me + 1)
    assert f"data directory {tmp_path} belongs to " in line
    assert f"(uid {me})" in line and f"(uid {me + 1})" in line
    assert "does not change the owner" in line and "chown -R " in line
    assert "\n" not in line


@pytest.mark.parametrize("error, store, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/d/x"), None,
     "/d/x: No space left on device"),
    (OSError(errno.EACCES, "Permission denied"), None, "Permission denied"),
    (sqlite3.OperationalError("database or disk is full"), "/d/users.sqlite",
     "/d/users.sqlite: database or disk is full"),
    (sqlite3.OperationalError("unable to open database file"), None,
     "user store: unable to open database file"),
    (ValueError("odd"), None, "ValueError: odd"),
])
def test_describe(error, store, line):
    assert datadir.describe(error, store) == line


def test_owner_problem_names_a_directory_above_that_the_user_may_not_enter(tmp_path):
    me = os.geteuid()
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o600)            # no search permission, even for its owner
    try:
        line = datadir.owner_problem(locked / "var", me)
    finally:
        os.chmod(locked, 0o700)
    assert line is not None and f"data directory {locked / 'var'}" in line
    if me == 0:                        # root may stat through it: the check itself speaks
        assert f"may not enter {locked} (mode 0600, owner root)" in line
