"""Authenticator: bcrypt runs in the thread pool; login forms follow vpopmail."""

from __future__ import annotations

import queue
import threading

import pytest
from twisted.python.threadpool import ThreadPool

from mailappliance.users.auth import Authenticator, login_address
from mailappliance.users.store import UserStore


@pytest.mark.parametrize("login, expected", [
    ("joe", "joe@test.com"), ("joe@Other.org", "joe@other.org"), ("joe%other.org", "joe@other.org"),
    ("", None), ("jo e", None), ("joe@bad domain", None), ("x" * 400, None), ("@test.com", None),
])
def test_login_forms(login, expected):
    assert login_address(login, "test.com") == expected


def test_plain_login_without_default_domain_is_refused():
    assert login_address("joe", None) is None


class QueueReactor:
    """Just enough reactor for deferToThreadPool: results come back through a queue."""

    def __init__(self):
        self.calls = queue.Queue()

    def callFromThread(self, f, *a, **kw):
        self.calls.put((f, a, kw))


def test_checks_run_in_the_pool_not_the_calling_thread(tmp_path):
    store = UserStore(tmp_path, bcrypt_cost=4)
    store.add_domain("test.com")
    store.add_user("joe@test.com", "Passw0rd!")
    seen_threads = []
    real_check = store.check_password

    def check(address, pw):
        seen_threads.append(threading.current_thread())
        return real_check(address, pw)
    store.check_password = check
    pool = ThreadPool(1, 2, name="test")
    pool.start()
    fake = QueueReactor()
    auth = Authenticator(store, fake, pool)
    results = {}
    try:
        for login, pw in [("joe", "Passw0rd!"), ("joe", "wrong-1A!"), ("ghost", "Passw0rd!"),
                          ("bad login", "x")]:
            d = auth.authenticate(login, pw, "test.com")
            f, a, kw = fake.calls.get(timeout=30)
            f(*a, **kw)
            out = []
            d.addBoth(out.append)
            results[(login, pw)] = out[0]
    finally:
        pool.stop()
    assert results[("joe", "Passw0rd!")].address == "joe@test.com"
    assert results[("joe", "wrong-1A!")] is None
    assert results[("ghost", "Passw0rd!")] is None, "unknown users fail the same way"
    assert results[("bad login", "x")] is None, "and unparsable logins too, after a bcrypt"
    assert len(seen_threads) == 4
    assert all(t is not threading.main_thread() for t in seen_threads)
