"""conf/: the production example loads with the strict loader and says what README promises."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailappliance.config import load_settings

CONF = Path(__file__).resolve().parents[2] / "conf"


def self_signed(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@pytest.fixture
def settings(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    self_signed(etc)
    (etc / "tcp.smtp").write_text((CONF / "tcp.smtp").read_text())
    text = (CONF / "mailappliance.toml").read_text().replace("/etc/mailappliance", str(etc))
    cfg = etc / "mailappliance.toml"
    cfg.write_text(text)
    return load_settings(cfg, cwd=tmp_path)


def test_production_example_is_valid_and_listens_on_the_standard_ports(settings):
    assert settings.listen.smtp == ("tcp:25",)
    assert settings.listen.submission == ("tcp:587",)
    assert settings.listen.pop3 == ("tcp:110",)
    assert settings.listen.pop3s == ("tcp:995",)
    assert settings.listen.admin == ("unix:/run/mailappliance/admin.sock",)
    assert settings.listen.inject == ("unix:/run/mailappliance/inject.sock",)
    assert settings.tls.enabled
    assert settings.data == Path("/var/lib/mailappliance")
    assert settings.smtp.dnsbl == ("dnsbl.example.net",)
    assert settings.pop3.roaming_relay_minutes == 30
    assert settings.admin.socket_mode == 0o600
    assert settings.log.stdout is False


def test_example_rules_relay_only_for_loopback_and_the_office(settings):
    rules = settings.rules
    assert rules.lookup("127.0.0.1").env.get("RELAYCLIENT") == ""
    assert rules.lookup("192.168.1.77").env.get("RELAYCLIENT") == ""
    assert "RELAYCLIENT" not in rules.lookup("127.0.0.2").env       # each 127.0.0.N is its own
    assert "RELAYCLIENT" not in rules.lookup("198.51.100.25").env
    assert rules.lookup("198.51.100.25").env.get("RBLSMTPD") == ""
    assert rules.lookup("203.0.113.200").allow is False
    assert rules.lookup("192.0.2.1").allow is True and not rules.lookup("192.0.2.1").env


def test_unit_and_toml_agree_on_paths():
    unit = (CONF / "mailappliance.service").read_text()
    toml = (CONF / "mailappliance.toml").read_text()
    assert "--config /etc/mailappliance/mailappliance.toml" in unit
    assert 'data = "/var/lib/mailappliance"' in toml
    assert "ReadWritePaths=/var/lib/mailappliance" in unit.splitlines()
    assert 'admin = ["unix:/run/mailappliance/admin.sock"]' in toml
    assert "RuntimeDirectory=mailappliance" in unit.splitlines()
