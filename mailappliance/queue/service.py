"""make_service component for the queue: app.injector (the one door) and app.queue_manager.

Called by mailappliance.service.make_service as ``attach(app, parent)`` after the DNS
component (remote delivery needs app.resolver).
"""

from __future__ import annotations

from mailappliance.queue.inject import Injector
from mailappliance.queue.store import QueueStore


def queue_dir(settings):
    return settings.data / "queue"


def attach(app, parent) -> None:
    store = QueueStore(queue_dir(app.settings))
    app.queue_store = store
    manager = None
    try:
        from mailappliance.queue.manager import build_manager
    except ModuleNotFoundError:    # the manager lands after the injector
        build_manager = None

    def on_commit(qid: int) -> None:
        if app.queue_manager is not None:
            app.queue_manager.notify(qid)

    app.injector = Injector(store, app.reactor, app.threadpool, on_commit=on_commit)
    if build_manager is not None:
        manager = build_manager(app, store)
        app.queue_manager = manager
        manager.setServiceParent(parent)
