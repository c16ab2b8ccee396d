"""The server TLS context shared by POP3 (STLS, pop3s) and SMTP (STARTTLS, submissions).

    tls = TLSContext(settings.tls)
    tls.options()   -> IOpenSSLServerConnectionCreator for transport.startTLS() or
                       TLSMemoryBIOFactory (implicit TLS); always the current certificate
    tls.reload()    -> re-read cert and key; ConfigError on failure, the old pair stays in use

pyOpenSSL through twisted.internet.ssl.CertificateOptions: TLS 1.2 at least (RFC 8996 retired
1.0 and 1.1; RFC 8314 section 4.1), no compression, server cipher preference, Twisted's
default cipher list (forward-secret AEAD suites first). The certificate file may hold the
chain: the first PEM certificate is the server's, the rest are sent as intermediates.

The object itself is the connection creator, so listeners built before a reload pick up the
new certificate for every new connection without being rebuilt.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from mailappliance.config import ConfigError


# RFC 8996 deprecates TLS 1.0 and 1.1; RFC 8314 section 4.1 asks for 1.2 or later.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
# Certificates and keys are a few KiB; a file much larger than this is not one.
MAX_PEM_BYTES = 1 << 20


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"tls.{what}: cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ConfigError(f"tls.{what}: {path} is larger than {MAX_PEM_BYTES} bytes")
    return data


def load_certificate_options(cert_path: Path, key_path: Path) -> ssl.CertificateOptions:
    """CertificateOptions for a PEM chain and key; ConfigError naming the file on any problem."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_pem = _read(cert_path, "cert")
    key_pem = _read(key_path, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"tls.cert: {cert_path} holds no PEM certificate") from None
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"tls.key: {key_path} is not an unencrypted PEM private key") from None
    options = ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=MINIMUM_TLS_VERSION,
    )
    try:
        options.getContext()      # builds the context now: a key/cert mismatch fails here
    except SSL.Error as e:
        raise ConfigError(f"tls.key: {key_path} does not match the certificate {cert_path}"
                          f" ({e})") from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class TLSContext:
    log = Logger()

    def __init__(self, tls_settings) -> None:
        if tls_settings.cert is None or tls_settings.key is None:
            raise ConfigError("tls: cert and key must be given together")
        self.settings = tls_settings
        self._options = load_certificate_options(tls_settings.cert, tls_settings.key)
        # Server handshakes completed (STARTTLS, STLS, implicit TLS), for the metrics.
        self.handshakes = 0
        self._counted: weakref.WeakSet = weakref.WeakSet()   # connections already counted
        self._count_handshakes(self._options)

    def _count_handshakes(self, options) -> None:
        def info(conn, where, _ret) -> None:
            # TLS 1.3 may report HANDSHAKE_DONE again (session tickets): once per connection.
            if where & SSL.SSL_CB_HANDSHAKE_DONE and conn not in self._counted:
                self._counted.add(conn)
                self.handshakes += 1
        options.getContext().set_info_callback(info)

    def options(self) -> "TLSContext":
        return self

    def context(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)

    def reload(self, tls_settings=None) -> None:
        """Re-read cert and key (new paths if given); on error keep serving the old pair."""
        new = tls_settings or self.settings
        if new.cert is None or new.key is None:
            raise ConfigError("tls: cert and key must be given together")
        options = load_certificate_options(new.cert, new.key)
        self._count_handshakes(options)
        self._options = options
        self.settings = new
        self.log.info("tls: loaded certificate {cert}", cert=str(new.cert))


def build_tls(settings) -> TLSContext | None:
    """make_service's TLS part: the context for [tls], or None without a certificate."""
    return TLSContext(settings.tls) if settings.tls.cert is not None else None


