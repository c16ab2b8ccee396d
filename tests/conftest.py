"""Shared test helpers."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an interoperability tool; in CI a missing tool fails the test instead of skipping."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (installed by .ci/run) but is missing")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture(scope="session")
def clamd_daemon(tmp_path_factory):
    """A private clamd (tests/scanners.py) for the whole test session; do not kill it."""
    from tests.scanners import ClamdDaemon
    daemon = ClamdDaemon(tmp_path_factory.mktemp("clamd"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="session")
def rspamd_daemon(tmp_path_factory):
    """A private rspamd with the test's Lua rules (tests/scanners.py) for the whole session."""
    from tests.scanners import RspamdDaemon
    daemon = RspamdDaemon(tmp_path_factory.mktemp("rspamd"))
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


# PostgreSQL: a private cluster per session, a database per test (tests/pg_support.py).
from tests.pg_support import pg_database, pg_uri, postgres_cluster  # noqa: E402,F401
