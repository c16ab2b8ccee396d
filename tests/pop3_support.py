"""Helpers for the POP3 and TLS tests: throw-away certificates and Maildir messages."""

from __future__ import annotations

import datetime
import ipaddress
import os
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_cert(directory: Path, name: str = "mx.test.example", stem: str = "server",
              ca: tuple | None = None) -> tuple[Path, Path]:
    """Write <stem>.pem (certificate, plus the CA's if `ca` signs it) and <stem>.key.

    `ca` is (ca_cert, ca_key) from make_ca(); without it the certificate is self-signed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = ca if ca else (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.SubjectAlternativeName(
                   [x509.DNSName(name), x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False))
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if issuer_cert is not None:
        pem += issuer_cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def make_ca(directory: Path, name: str = "Test CA") -> tuple[x509.Certificate, object, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = Path(directory) / "ca.pem"
    Path(directory).mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


_seq = 0


def deliver(maildir: Path, content: bytes, *, sub: str = "new", mtime: float | None = None,
            name: str | None = None) -> str:
    """Put one message into a Maildir the way a delivery agent does (tmp/ then rename).
    Returns its file name."""
    global _seq
    _seq += 1
    maildir = Path(maildir)
    for d in ("tmp", "new", "cur"):
        (maildir / d).mkdir(parents=True, exist_ok=True)
    when = time.time() if mtime is None else mtime
    name = name or f"{int(when)}.M{_seq}P{os.getpid()}.test.example"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(content)
    os.utime(tmp, (when, when))
    os.rename(tmp, maildir / sub / name)
    return name


def message(n: int, size: int = 0) -> bytes:
    head = (f"From: sender{n}@example.org\nTo: test@test.com\n"
            f"Subject: message {n}\nMessage-ID: <{n}.{os.getpid()}@test.example>\n\n").encode()
    body = f"body of message {n}\n".encode()
    if size > len(head) + len(body):
        line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\n"
        need = size - len(head) - len(body)
        body += (line * (need // len(line) + 1))[:need - 1] + b"\n"
    return head + body
