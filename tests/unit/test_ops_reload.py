"""Reload: the new file is parsed whole before anything changes; restart-only settings stay;
a hook that fails rolls back; SIGHUP goes through the reactor loop."""

from __future__ import annotations

import signal

import pytest
from twisted.internet import defer

from mailappliance import reload as rl
from mailappliance.config import load_settings
from mailappliance.testing.app import build_test_app


def sync(f, *a):
    return defer.maybeDeferred(f, *a)


@pytest.fixture
def setup(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('hostname = "one.test.com"\n[listen]\nsmtp = ["tcp:2525:interface=127.0.0.1"]\n')
    settings = load_settings(cfg, {"data": str(tmp_path / "var"), "bcrypt_cost": 4},
                             cwd=tmp_path)
    app = build_test_app(settings=settings)
    yield app, cfg
    app.store.close()


def test_command_line_overrides_survive_a_reload(setup, tmp_path):
    app, cfg = setup
    cfg.write_text('hostname = "two.test.com"\ndata = "/elsewhere"\nbcrypt_cost = 5\n')
    lines = rl.Reloader(app.live, sync, app.stats).reload("test").result
    # --data from the command line beats the file, as at start-up
    assert app.settings.data == tmp_path / "var"
    assert app.settings.hostname == "two.test.com"
    assert app.store.bcrypt_cost == 4     # --bcrypt_cost beats the file's 5 here too
    assert lines[0] == f"configuration reloaded from {cfg}"


def test_restart_only_settings_keep_their_values_and_are_named(setup):
    app, cfg = setup
    cfg.write_text('hostname = "one.test.com"\n[listen]\nsmtp = ["tcp:25"]\npop3 = []\n'
                   '[log]\ndirectory = "/tmp/elsewhere"\nkeep = 3\n[admin]\nsocket_mode = 432\n')
    old = app.settings
    lines = rl.Reloader(app.live, sync, app.stats).reload("test").result
    assert app.settings.listen == old.listen
    assert app.settings.log.directory == old.log.directory and app.settings.log.keep == 3
    assert app.settings.admin.socket_mode == 0o600
    assert lines[-1] == ("not applied until restart: listen.smtp, listen.pop3, log.directory, "
                         "admin.socket_mode")


def test_a_bad_file_is_refused_and_nothing_changes(setup):
    app, cfg = setup
    seen = []
    app.reload_hooks.append(seen.append)
    old = app.settings
    cfg.write_text('hostname = "two.test.com"\n[smtp]\nbogus_key = 1\n')
    d = rl.Reloader(app.live, sync, app.stats).reload("test")
    failure = d.result
    d.addErrback(lambda f: None)
    assert isinstance(failure.value, rl.ReloadRefused)
    assert str(failure.value) == (f"reload refused: {cfg}: smtp.bogus_key: unknown key; "
                                  "the old configuration stays in force")
    assert app.settings is old and seen == []


def test_a_missing_rules_file_is_refused(setup, tmp_path):
    app, cfg = setup
    cfg.write_text(f'[smtp]\nrules = "{tmp_path}/nope"\n')
    d = rl.Reloader(app.live, sync, app.stats).reload("test")
    f = d.result
    d.addErrback(lambda _: None)
    assert "cannot read rules file" in str(f.value)


def test_a_failing_hook_rolls_back_to_the_old_settings(setup):
    app, cfg = setup
    old = app.settings
    calls = []

    def picky(settings):
        calls.append(settings.hostname)
        if settings.hostname == "two.test.com":
            raise ValueError("cannot apply")
    app.reload_hooks.append(picky)
    cfg.write_text('hostname = "two.test.com"\n')
    d = rl.Reloader(app.live, sync, app.stats).reload("test")
    f = d.result
    d.addErrback(lambda _: None)
    assert "ValueError: cannot apply" in str(f.value)
    assert app.settings is old
    assert calls == ["two.test.com", "one.test.com"]


def test_reloads_run_one_at_a_time(setup):
    app, cfg = setup
    gates = []

    def slow(f, *a):
        d = defer.Deferred()
        gates.append((d, f, a))
        return d
    r = rl.Reloader(app.live, slow, app.stats)
    first, second = r.reload("a"), r.reload("b")
    assert len(gates) == 1
    d, f, a = gates.pop()
    d.callback(f(*a))
    assert first.called and len(gates) == 1
    d, f, a = gates.pop()
    d.callback(f(*a))
    assert second.called and r.reloads == 2


class FakeSignals:
    SIGHUP = signal.SIGHUP

    def __init__(self):
        self.handlers = {signal.SIGHUP: signal.SIG_DFL}

    def signal(self, num, handler):
        old, self.handlers[num] = self.handlers[num], handler
        return old


def test_sighup_reloads_through_the_reactor_and_restores_the_old_handler(setup):
    app, cfg = setup
    signals = FakeSignals()
    r = rl.Reloader(app.live, sync, app.stats)
    hup = rl.HangupService(r, app.reactor, signals=signals)
    hup.startService()
    cfg.write_text('hostname = "three.test.com"\n')
    signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
    assert app.settings.hostname == "three.test.com" and r.reloads == 1
    cfg.write_text('hostname = "bad host name"\n')
    signals.handlers[signal.SIGHUP](signal.SIGHUP, None)     # refused, logged, not raised
    assert hup.last.called and hup.last.result is None
    assert app.settings.hostname == "three.test.com"
    hup.stopService()
    assert signals.handlers[signal.SIGHUP] is signal.SIG_DFL
