"""check.py's listener clash rule and permission judgement, on settings and stat results."""

from __future__ import annotations

import os
import stat

from mailappliance import check
from mailappliance.config import load_settings


def clashes(tmp_path, **listen):
    s = load_settings(None, {"data": str(tmp_path), **{f"listen.{k}": v
                                                      for k, v in listen.items()}},
                      cwd=tmp_path)
    return check.check_listeners(s)


def test_listener_clashes(tmp_path):
    base = dict(smtp=[], submission=[], pop3=[], admin=[f"unix:{tmp_path}/a.sock"])
    assert clashes(tmp_path, **base) == []
    assert clashes(tmp_path, **{**base, "smtp": ["tcp:25"], "pop3": ["tcp:25:interface=127.0.0.1"]})
    assert clashes(tmp_path, **{**base, "smtp": ["tcp:25:interface=127.0.0.1"],
                                "submission": ["tcp:25:interface=127.0.0.2"]}) == []
    assert clashes(tmp_path, **{**base, "smtp": ["tcp:0:interface=127.0.0.1"],
                                "submission": ["tcp:0:interface=127.0.0.1"]}) == []
    assert clashes(tmp_path, **{**base, "smtp": ["tcp:2525:interface=127.0.0.1",
                                                 "tcp:2525:interface=127.0.0.1"]})
    os.chmod(tmp_path, 0o755)
    got = clashes(tmp_path, **{**base, "inject": [f"unix:{tmp_path}/a.sock"]})
    assert got == [f"listen.admin and listen.inject: both listen on the unix socket "
                   f"{tmp_path}/a.sock"]


def test_the_inject_socket_directory_must_let_others_in(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o750)
    os.chmod(d, 0o750)
    got = clashes(tmp_path, admin=[], inject=[f"unix:{d}/inject.sock"])
    assert len(got) == 1 and "keeps other users from the socket" in got[0]
    os.chmod(d, 0o755)
    assert clashes(tmp_path, admin=[], inject=[f"unix:{d}/inject.sock"]) == []


def fake_stat(uid, gid, mode):
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def test_permission_judgement_by_owner_group_other():
    u = check.ServerUser("svc", 1000, frozenset({1000, 50}))
    assert check._allowed(fake_stat(1000, 0, 0o400), u, check.READ)
    assert not check._allowed(fake_stat(1000, 50, 0o040), u, check.READ)   # owner bits decide
    assert check._allowed(fake_stat(0, 50, 0o640), u, check.READ)
    assert not check._allowed(fake_stat(0, 0, 0o640), u, check.READ)
    assert check._allowed(fake_stat(0, 0, 0o644), u, check.READ)
    assert check._allowed(fake_stat(0, 0, 0o000), check.ServerUser("root", 0, frozenset()),
                          check.READ)
