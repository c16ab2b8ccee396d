"""A real App for adapter tests, built the way make_service builds it, without a process.

    app = build_test_app(tmp_path)                       # ThreadlessReactor, inline thread pool
    app = build_test_app(tmp_path, hostname="mx.test.example", default_domain="test.com")
    app = build_test_app(settings=load_settings(cfg, overrides), threadpool=DeferredThreadPool())

Every part is the real one (user store, authenticator, relay grants on the reactor's clock,
TLS from the settings' [tls], resolver, DNSBL checker, queue store, injector, queue manager,
reloader, drain), put together by service.build_app with the reload hooks in the server's
order. Left out are the parts that belong to a whole process: the instance lock, the log files
(global observers), sd_notify, the privilege hand-over and the listeners (build them with a
job's `build_factory(app, kind)`). Nothing is started: the queue manager does not scan, no
thread runs, nothing listens, and the reactor is a MemoryReactorClock that only the test
advances.

Defaults fit unit tests: bcrypt cost 4 (the minimum), hostname mx.test.example, the data
directory given, and `[verify]` all off (VERIFY_OFF): with the product's default, every MAIL
FROM from an untrusted test client would ask DNS for SPF (and wait forever on the test's
reactor). Tests of verification set [verify] themselves and a resolver that answers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mailappliance.config import Settings, VerifySettings
from mailappliance.queue.store import QueueStore
from mailappliance.app import App
from mailappliance.service import build_app, build_shared
from mailappliance.testing.threads import ImmediateThreadPool, ThreadlessReactor

# The cheapest cost bcrypt accepts: hashing in tests takes about a millisecond.
TEST_BCRYPT_COST = 4
TEST_HOSTNAME = "mx.test.example"        # RFC 2606 name
VERIFY_OFF = VerifySettings(spf="off", dkim="off", dmarc="off")


def build_test_app(data: Path | None = None, *, settings: Settings | None = None,
                   reactor: Any = None, threadpool: Any = None,
                   queue_store: QueueStore | None = None, **fields: Any) -> App:
    """An App on `settings`, or on Settings(data=data, hostname=..., bcrypt_cost=4, **fields).

    reactor: a ThreadlessReactor (MemoryReactorClock whose callFromThread runs at once) unless
    given. threadpool: an ImmediateThreadPool (runs each call inline) unless given, e.g. a
    DeferredThreadPool to hold calls; deliveries use the same pool. queue_store: a QueueStore
    of the test's own (a clock, failing file operations) instead of one in data/queue.
    """
    if settings is None:
        if data is None:
            raise TypeError("build_test_app needs a data directory or settings")
        fields.setdefault("hostname", TEST_HOSTNAME)
        fields.setdefault("bcrypt_cost", TEST_BCRYPT_COST)
        fields.setdefault("verify", VERIFY_OFF)
        settings = Settings(data=Path(data), **fields)
    elif data is not None or fields:
        raise TypeError("build_test_app: give settings or data and fields, not both")
    reactor = reactor if reactor is not None else ThreadlessReactor()
    shared = build_shared(settings, reactor, threadpool or ImmediateThreadPool(),
                          grants_clock=reactor.seconds)
    return build_app(settings, reactor, shared, stats={}, started=time.time(),
                     queue_store=queue_store, delivery_threads=shared.threadpool)
