"""locate.py: the order in which a command finds its instance, and what counts as one."""

from __future__ import annotations

import pytest

from mailappliance.locate import NO, UNKNOWN, YES, NoInstance, instance_state, locate


def test_the_order_config_data_environment_system_file_then_var(tmp_path):
    system = tmp_path / "etc.toml"
    env = {"MAILAPPLIANCE_CONFIG": "env.toml"}
    kw = dict(cwd=tmp_path, system_config=system)
    assert locate("c.toml", "d", environ=env, **kw).config == tmp_path / "c.toml"
    assert locate("c.toml", "d", environ=env, **kw).data == tmp_path / "d"
    found = locate(None, "d", environ=env, **kw)
    assert (found.config, found.data, found.how) == (None, tmp_path / "d", "--data d")
    found = locate(None, None, environ=env, **kw)
    assert (found.config, found.how) == (tmp_path / "env.toml", "MAILAPPLIANCE_CONFIG=env.toml")
    with pytest.raises(NoInstance) as e:
        locate(None, None, environ={}, **kw)
    assert "looked for --config, --data, MAILAPPLIANCE_CONFIG" in str(e.value)
    assert locate(None, None, environ={}, may_create=True, **kw).data == tmp_path / "var"
    system.write_text("")
    assert locate(None, None, environ={}, **kw).config == system
    system.unlink()
    (tmp_path / "var").mkdir()
    with pytest.raises(NoInstance):                 # an empty ./var is no instance
        locate(None, None, environ={}, **kw)
    (tmp_path / "var" / "users.sqlite").touch()
    assert locate(None, None, environ={}, **kw).how == "./var"


def test_instance_state(tmp_path):
    assert instance_state(tmp_path / "missing") == NO
    assert instance_state(tmp_path) == NO
    (tmp_path / "queue").mkdir()
    assert instance_state(tmp_path) == YES
    f = tmp_path / "file"
    f.touch()
    assert instance_state(f) == NO


def test_a_directory_closed_to_this_user_is_unknown(tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("mailappliance.locate.os.listdir", denied)
    assert instance_state(tmp_path) == UNKNOWN
