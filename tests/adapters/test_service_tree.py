"""make_service on a MemoryReactorClock, nothing started: the tree's services in start order, an
App whose every part is there when it is made, one Listener per endpoint string from
LISTENER_KINDS, and the reload hooks in start order."""

from __future__ import annotations

import dataclasses
import os

from mailappliance.config import ListenSettings, LogSettings, Settings
from mailappliance.app import App, Listener
from mailappliance.service import LISTENER_KINDS, make_service
from mailappliance.testing.app import build_test_app
from mailappliance.testing.threads import ThreadlessReactor


def tree(tmp_path, **listen):
    settings = Settings(hostname="mx.test.example", data=tmp_path / "data", bcrypt_cost=4,
                        listen=ListenSettings(**{f.name: () for f in
                                                 dataclasses.fields(ListenSettings)} | listen),
                        log=LogSettings(stdout=True))       # no global file observer in a test
    top = make_service(settings, ThreadlessReactor())
    return top, top.app


def close(top, app):
    """What the unstarted tree holds: the lock, the store, the error ring's global observer."""
    os.close(app.instance_lock)
    app.store.close()
    list(top)[1].stopService()


def test_services_in_start_order_and_every_part_of_the_app_given(tmp_path):
    top, app = tree(tmp_path, smtp=("tcp:0:interface=127.0.0.1",),
                    admin=(f"unix:{tmp_path}/admin.sock",))
    try:
        assert [type(s).__name__ for s in top] == [
            "ThreadPoolService",        # the shared pool
            "_ErrorRingService",        # logging ([log] stdout: the error ring only)
            "LogCounterService",        # failed logins for stat and the metrics
            "ThreadPoolService",        # delivery threads, stopped after the manager
            "QueueManager",
            "HangupService",            # SIGHUP
            "NotifyService",
            "AdoptService",             # last before the listeners
            "Listener", "Listener",
            "ReadyService",
        ]
        assert [list(top)[i].pool for i in (0, 3)] == [app.threadpool, app.delivery_threads]
        assert list(top)[4] is app.queue_manager
        missing = [f.name for f in dataclasses.fields(App) if getattr(app, f.name) is None]
        assert missing == ["tls"]                 # no [tls] here; everything else was built
        assert isinstance(app.instance_lock, int)
        # tls, dns, dnsbl, queue, user store, mailauth, scan (no log hook with [log] stdout),
        # then the admin factory's token file
        assert len(app.reload_hooks) == 8
        assert app.reload_hooks[6] == app.scan.follow
        assert app.scan in app.end_of_data
        assert app.reload_hooks[1] == app.resolver.reload
        assert app.reload_hooks[2] == app.dnsbl.reload
        assert app.stop_hooks == [app.drain.start]
    finally:
        close(top, app)


def test_one_listener_per_endpoint_and_one_admin_factory_for_all(tmp_path):
    top, app = tree(tmp_path, smtp=("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"),
                    pop3=("tcp:0:interface=127.0.0.1",),
                    admin=(f"unix:{tmp_path}/a.sock", f"unix:{tmp_path}/b.sock"))
    try:
        assert [(l.kind, l.description) for l in app.listeners] == [
            ("smtp", "tcp:0:interface=127.0.0.1"), ("smtp", "tcp:0:interface=127.0.0.2"),
            ("pop3", "tcp:0:interface=127.0.0.1"),
            ("admin", f"unix:{tmp_path}/a.sock"), ("admin", f"unix:{tmp_path}/b.sock")]
        assert [l for l in top if isinstance(l, Listener)] == app.listeners
        smtp1, smtp2, _, admin1, admin2 = app.listeners
        assert smtp1.factory is not smtp2.factory          # own connection counters each
        assert admin1.factory is admin2.factory            # one limit, one token
    finally:
        close(top, app)


def test_every_listen_key_has_a_listener_kind():
    assert [k.name for k in LISTENER_KINDS] == [f.name for f in dataclasses.fields(ListenSettings)]


def test_a_test_app_has_the_servers_parts_without_a_process(tmp_path):
    app = build_test_app(tmp_path)
    assert app.instance_lock is None and app.listeners == []
    assert app.settings is app.live.settings and app.reload_hooks is app.live.hooks
    new = dataclasses.replace(app.settings, hostname="other.test.example")
    app.reload(new)
    assert app.settings is new and app.queue_manager.hostname == "other.test.example"
