"""Outbound opportunistic TLS (delivery/remote.py OpportunisticTLS): SNI, TLS >= 1.2, and the
report logged after the handshake -- version, cipher, and whether the certificate verified
(chain against the trusted CAs, name or IP with service-identity). Handshakes run between our
server TLSContext and the client creator over memory BIOs: no sockets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from OpenSSL import SSL

from mailappliance.delivery.remote import client_tls_options
from mailappliance.tls import TLSContext
from tests.pop3_support import make_ca, make_cert


def run_handshake(server_tls: TLSContext, creator) -> SSL.Connection:
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    client = creator.clientConnectionForTLS(None)
    for _ in range(50):
        done = True
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                done = False
        for a, b in ((client, server), (server, client)):
            try:
                while True:
                    b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done:
            return server
    raise AssertionError("handshake did not finish")


@pytest.fixture
def ca(tmp_path):
    ca_cert, ca_key, ca_path = make_ca(tmp_path / "ca")
    return ca_cert, ca_key, ca_path


def server_for(directory, **kw) -> TLSContext:
    cert, key = make_cert(directory, **kw)
    return TLSContext(SimpleNamespace(cert=cert, key=key))


def trusting(ca_path):
    make = client_tls_options()

    def creator(name):
        c = make(name)
        c.context.load_verify_locations(str(ca_path))
        return c
    return creator


def test_verified_certificate_by_name_with_sni(tmp_path, ca):
    ca_cert, ca_key, ca_path = ca
    server_tls = server_for(tmp_path / "s", name="mx.example.org", ca=(ca_cert, ca_key))
    creator = trusting(ca_path)("mx.example.org")
    server = run_handshake(server_tls, creator)
    assert server.get_servername() == b"mx.example.org"
    version, cipher, verdict = creator.report()
    assert (version, verdict) == ("TLSv1.3", "verified")
    assert cipher.startswith("TLS_")


def test_verified_certificate_by_ip_for_a_route_to_an_address(tmp_path, ca):
    ca_cert, ca_key, ca_path = ca
    server_tls = server_for(tmp_path / "s", ca=(ca_cert, ca_key))    # SAN has 127.0.0.1
    creator = trusting(ca_path)("127.0.0.1")
    server = run_handshake(server_tls, creator)
    assert server.get_servername() is None                           # no SNI for an address
    assert creator.report()[2] == "verified"


def test_name_mismatch_is_reported_not_refused(tmp_path, ca):
    ca_cert, ca_key, ca_path = ca
    server_tls = server_for(tmp_path / "s", name="mx.example.org", ca=(ca_cert, ca_key))
    creator = trusting(ca_path)("mx.other.example")
    run_handshake(server_tls, creator)
    assert creator.report()[2] == "not verified: it does not name mx.other.example"


def test_self_signed_and_unknown_ca_are_reported(tmp_path, ca):
    _, _, ca_path = ca
    creator = trusting(ca_path)("mx.test.example")
    run_handshake(server_for(tmp_path / "self"), creator)
    assert creator.report()[2] == "not verified: self-signed certificate"
    other_cert, other_key, _ = make_ca(tmp_path / "other-ca", name="Other CA")
    creator = trusting(ca_path)("mx.test.example")
    run_handshake(server_for(tmp_path / "o", ca=(other_cert, other_key)), creator)
    assert creator.report()[2] == "not verified: self-signed certificate in certificate chain"


def test_client_refuses_a_server_that_stops_at_tls_1_1(tmp_path):
    cert, key = make_cert(tmp_path)

    def old_server(max_version):
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_max_proto_version(max_version)
        ctx.use_certificate_file(str(cert))
        ctx.use_privatekey_file(str(key))
        return SimpleNamespace(serverConnectionForTLS=lambda _p: SSL.Connection(ctx, None))

    # Control: a client that allows TLS 1.1 gets through to the same server.
    lax = SSL.Context(SSL.TLS_CLIENT_METHOD)
    lax.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    lax.set_min_proto_version(SSL.TLS1_VERSION)

    class Lax:
        def clientConnectionForTLS(self, _p):
            c = SSL.Connection(lax, None)
            c.set_connect_state()
            return c
    run_handshake(old_server(SSL.TLS1_1_VERSION), Lax())
    creator = client_tls_options()("mx.test.example")
    with pytest.raises(SSL.Error):
        run_handshake(old_server(SSL.TLS1_1_VERSION), creator)
    creator = client_tls_options()("mx.test.example")
    run_handshake(old_server(SSL.TLS1_2_VERSION), creator)
    assert creator.report()[0] == "TLSv1.2"
