from __future__ import annotations

import pytest

from tests.integration.server import ServerProcess


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(config_toml_text="", **kw) -> ServerProcess (not yet started)."""
    servers: list[ServerProcess] = []

    def factory(config: str = "", name: str = "server", **kw) -> ServerProcess:
        srv = ServerProcess(tmp_path / name, config, **kw)
        servers.append(srv)
        return srv

    yield factory
    for srv in servers:
        srv.stop()


@pytest.fixture
def server(make_server):
    """A running server with domain test.com and user test@test.com (password Passw0rd!)."""
    srv = make_server('default_domain = "test.com"\n')
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    return srv.start()
