"""Fixtures for the PostgreSQL backend: one private cluster per test session, a database per
test. Outside CI a machine without the `postgresql` package skips these tests; under CI=true
(.ci/run installs the package) they fail instead."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_psycopg(module_level: bool = False) -> None:
    """Skip without psycopg and psycopg_pool (`pip install .[postgresql]`); fail in CI, whose
    test extra installs them."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as e:
        if IN_CI:
            pytest.fail(f"psycopg is required in CI (the test extra) but is missing: {e}",
                        pytrace=False)
        pytest.skip(f"psycopg not installed: {e}", allow_module_level=module_level)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A running PostgreSQL cluster (mailappliance.testing.postgres.PostgresCluster)."""
    require_psycopg()
    from mailappliance.testing.postgres import ClusterUnavailable, PostgresCluster
    try:
        cluster = PostgresCluster()
    except ClusterUnavailable as e:
        if IN_CI:
            pytest.fail(f"{e}: .ci/run installs it, CI must have it")
        pytest.skip(str(e))
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_database(postgres_cluster):
    """(cluster, database name) of a fresh empty database owned by the product's role."""
    name = postgres_cluster.create_database()
    yield postgres_cluster, name
    postgres_cluster.drop_database(name)


@pytest.fixture
def pg_uri(pg_database) -> str:
    """The libpq URI (with password) of a fresh empty database."""
    cluster, name = pg_database
    return cluster.uri(name)
