"""The shared TLS context: loading, errors, TLS >= 1.2, chains, reload. Handshakes run over
memory BIOs (pyOpenSSL server, Python ssl client): no sockets."""

from __future__ import annotations

import ssl
import dataclasses

import pytest
from OpenSSL import SSL

from mailappliance.config import ConfigError, TLSSettings
from mailappliance.testing.app import build_test_app
from mailappliance.tls import TLSContext
from tests.pop3_support import make_ca, make_cert


def settings(cert, key):
    return TLSSettings(cert=cert, key=key)


def handshake(tls: TLSContext, *, maximum=None, minimum=None, cafile=None,
              server_name="mx.test.example"):
    """Run a TLS handshake between the server context and a Python client in memory.
    Returns (client SSLObject, server Connection) or raises the client's ssl.SSLError."""
    server = tls.serverConnectionForTLS(None)
    server.set_accept_state()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if maximum is not None and maximum < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")     # let the client really offer old versions
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    for _ in range(50):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        data = outgoing.read()
        if data:
            server.bio_write(data)
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error:
            pass          # the server refused; the client sees the alert next round
        try:
            while True:
                incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
        if done:
            return client, server
    raise AssertionError("handshake did not finish")


def cn(server) -> str:
    return server.get_certificate().to_cryptography().subject.rfc4514_string().removeprefix("CN=")


@pytest.fixture
def pair(tmp_path):
    return make_cert(tmp_path)


def test_handshake_tls13_and_tls12(pair):
    tls = TLSContext(settings(*pair))
    client, _ = handshake(tls)
    assert client.version() == "TLSv1.3"
    client, _ = handshake(tls, maximum=ssl.TLSVersion.TLSv1_2)
    assert client.version() == "TLSv1.2"
    assert "GCM" in client.cipher()[0] or "CHACHA20" in client.cipher()[0]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_below_1_2_refused(pair, version):
    tls = TLSContext(settings(*pair))
    flags = tls.context().set_options(0)    # returns the current option mask
    with pytest.raises(ssl.SSLError):
        handshake(tls, minimum=ssl.TLSVersion.TLSv1, maximum=version)
    assert flags & SSL.OP_NO_TLSv1 and flags & SSL.OP_NO_TLSv1_1
    assert flags & SSL.OP_NO_COMPRESSION


def test_chain_is_sent_and_verifies_against_the_ca(tmp_path):
    ca_cert, ca_key, ca_path = make_ca(tmp_path)
    cert, key = make_cert(tmp_path, ca=(ca_cert, ca_key))
    tls = TLSContext(settings(cert, key))
    client, _ = handshake(tls, cafile=str(ca_path))
    assert client.getpeercert()["subject"] == ((("commonName", "mx.test.example"),),)


def test_errors_are_config_errors_naming_the_file(tmp_path, pair):
    cert, key = pair
    other_cert, other_key = make_cert(tmp_path / "other", stem="other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls.cert: .*junk.pem holds no PEM certificate"):
        TLSContext(settings(junk, key))
    with pytest.raises(ConfigError, match=r"tls.key: .*junk.pem"):
        TLSContext(settings(cert, junk))
    with pytest.raises(ConfigError, match=r"tls.key: .*other.key does not match"):
        TLSContext(settings(cert, other_key))
    with pytest.raises(ConfigError, match=r"tls.cert: cannot read .*missing.pem"):
        TLSContext(settings(tmp_path / "missing.pem", key))
    with pytest.raises(ConfigError):
        TLSContext(settings(None, None))


def test_reload_switches_certificate_and_bad_reload_keeps_old(tmp_path):
    cert1, key1 = make_cert(tmp_path / "a", name="one.test.example")
    cert2, key2 = make_cert(tmp_path / "b", name="two.test.example")
    tls = TLSContext(settings(cert1, key1))

    def served_name():
        _, server = handshake(tls)
        return cn(server)

    assert served_name() == "one.test.example"
    tls.reload(settings(cert2, key2))
    assert served_name() == "two.test.example"
    (tmp_path / "b" / "server.pem").write_text("garbage")
    with pytest.raises(ConfigError):
        tls.reload()
    assert served_name() == "two.test.example"


def with_tls(app, cert, key):
    return dataclasses.replace(app.settings, tls=TLSSettings(cert, key))


def test_the_app_gets_tls_from_settings_and_follows_reload(tmp_path, pair):
    cert2, key2 = make_cert(tmp_path / "b", name="two.test.example")
    app = build_test_app(tmp_path / "data", tls=TLSSettings(*pair))
    assert isinstance(app.tls, TLSContext)
    app.reload(with_tls(app, cert2, key2))
    _, server = handshake(app.tls)
    assert cn(server) == "two.test.example"
    # A broken file on reload is refused (the reloader then rolls back) and the old
    # certificate stays in use.
    (tmp_path / "b" / "server.key").write_text("garbage")
    with pytest.raises(ConfigError):
        app.reload(with_tls(app, cert2, tmp_path / "b" / "server.key"))
    _, server = handshake(app.tls)
    assert cn(server) == "two.test.example"


def test_without_tls_a_reload_can_switch_it_on_but_not_off(tmp_path, pair):
    app = build_test_app(tmp_path / "data")
    assert app.tls is None
    app.reload(app.settings)                          # still no [tls]: nothing to do
    assert app.tls is None
    app.reload(with_tls(app, *pair))
    _, server = handshake(app.tls)
    assert cn(server) == "mx.test.example"
    app.reload(with_tls(app, None, None))             # switching off needs a restart
    _, server = handshake(app.tls)
    assert cn(server) == "mx.test.example"
