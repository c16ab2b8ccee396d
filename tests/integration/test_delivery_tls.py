"""Opportunistic STARTTLS in remote delivery: the real server delivers to an aiosmtpd peer that
refuses MAIL before STARTTLS (require_starttls), so arrival proves the session was encrypted."""

from __future__ import annotations

import ssl

import pytest

from mailappliance.queue.store import QueueStore
from tests.integration.delivery_support import free_port, queue_ids, wait_until
from tests.pop3_support import make_cert

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")


class Recorder:
    def __init__(self) -> None:
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                              session.ssl is not None))
        return "250 OK stored"


@pytest.fixture
def tls_peer(tmp_path):
    cert, key = make_cert(tmp_path / "peer-cert", name="peer.example.org")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    handler = Recorder()
    port = free_port()
    controller = aiosmtpd_controller.Controller(handler, hostname="127.0.0.1", port=port,
                                                tls_context=ctx, require_starttls=True)
    controller.start()
    yield handler, port
    controller.stop()


def test_remote_delivery_uses_starttls_when_offered(make_server, tls_peer):
    handler, port = tls_peer
    srv = make_server(f'default_domain = "test.com"\n[routes]\n"example.org" = "127.0.0.1:{port}"\n')
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.start()
    QueueStore(srv.data / "queue").inject(b"Subject: secret\n\nover TLS\n", "a@test.com",
                                          ["bob@example.org"])
    wait_until(lambda: handler.messages, what="delivery to the TLS peer")
    [(mail_from, rcpts, content, encrypted)] = handler.messages
    assert (mail_from, rcpts, encrypted) == ("a@test.com", ["bob@example.org"], True)
    assert content == b"Subject: secret\r\n\r\nover TLS\r\n"
    wait_until(lambda: queue_ids(srv) == [], what="the queue to empty")
