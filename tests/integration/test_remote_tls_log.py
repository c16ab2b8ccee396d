"""Outbound TLS is logged: the real server delivers to an aiosmtpd peer that insists on
STARTTLS, and the delivery log says the TLS version and whether the peer's certificate
verified -- "verified" when the server trusts the peer's CA (SSL_CERT_FILE, honoured by
OpenSSL's default verify paths), "not verified: ..." otherwise, and delivery happens either way
(opportunistic TLS, Postfix's smtp_tls_security_level = may)."""

from __future__ import annotations

import re
import ssl

import pytest

from mailappliance.queue.store import QueueStore
from tests.integration.delivery_support import free_port, wait_until
from tests.pop3_support import make_ca, make_cert

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")


class Recorder:
    def __init__(self) -> None:
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(session.ssl is not None)
        return "250 OK stored"


@pytest.fixture
def ca_signed_peer(tmp_path):
    ca_cert, ca_key, ca_path = make_ca(tmp_path / "ca")
    cert, key = make_cert(tmp_path / "peer", name="peer.example.org", ca=(ca_cert, ca_key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    handler = Recorder()
    port = free_port()
    controller = aiosmtpd_controller.Controller(handler, hostname="127.0.0.1", port=port,
                                                tls_context=ctx, require_starttls=True)
    controller.start()
    yield handler, port, ca_path
    controller.stop()


@pytest.mark.parametrize("trust, verdict", [
    (True, "certificate verified"),
    (False, "certificate not verified: self-signed certificate in certificate chain"),
])
def test_delivery_logs_tls_version_and_verification(make_server, ca_signed_peer, trust,
                                                    verdict):
    handler, port, ca_path = ca_signed_peer
    env = {"SSL_CERT_FILE": str(ca_path)} if trust else {"SSL_CERT_FILE": "/nonexistent"}
    srv = make_server(f'default_domain = "test.com"\n'
                      f'[routes]\n"example.org" = "127.0.0.1:{port}"\n', env=env)
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.start()
    QueueStore(srv.data / "queue").inject(b"Subject: tls\n\nx\n", "a@test.com",
                                          ["bob@example.org"])
    wait_until(lambda: handler.messages, what="delivery to the TLS peer")
    assert handler.messages == [True]
    current = srv.data / "log" / "current"
    line = wait_until(lambda: re.search(r"delivery: remote: TLS with .*", current.read_text()),
                      what="the TLS log line").group(0)
    # A route to an address: the certificate must name that IP (its SAN has 127.0.0.1).
    assert re.fullmatch(r"delivery: remote: TLS with 127\.0\.0\.1\[127\.0\.0\.1\]: "
                        r"TLSv1\.[23] \S+, " + re.escape(verdict), line), line
