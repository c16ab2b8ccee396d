"""`build_factory(app, kind)`: one SMTP listener's factory, tcpserver's share of the work.

Each listening endpoint gets its own factory and so its own connection counters, as each port
had its own tcpserver (`-c` for max_connections; max_per_ip as tcpserver's per-IP limit patches
and Postfix's smtpd_client_connection_count_limit): [smtp] for port 25, [submission] for
submission and submissions. The per-address limit is checked first, so a flood from one
address is told so; past max_connections, or past the endpoint's share of the process's
descriptors (descriptors.py), the client gets 421. The limits are read from `app.settings` at
every connection, so a reload applies them to the next client.
"""

from __future__ import annotations

from twisted.internet import endpoints, protocol
from twisted.logger import Logger

from mailappliance import stats
from mailappliance.config import ConfigError
from mailappliance.smtp import replies
from mailappliance.smtp.protocol import SMTPServerProtocol
from mailappliance.smtp.replies import Reply

KINDS = ("smtp", "submission", "submissions")
# listen(2) backlog for SMTP listeners without an explicit backlog= option. Twisted's default is
# 50; under a connection burst the kernel's accept queue overflows and, with SYN cookies on,
# the client believes it is connected while the server never sees the connection (an idle
# client then waits forever for the greeting). Linux caps the value at net.core.somaxconn.
LISTEN_BACKLOG = 1024
_BACKLOG_TYPES = ("tcp:", "tcp6:", "ssl:")


class SMTPFactory(protocol.ServerFactory):
    log = Logger(namespace="mailappliance.smtp")
    noisy = False         # no "Starting factory" lines in the mail log
    protocol = SMTPServerProtocol

    def __init__(self, app, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown SMTP listener kind {kind!r}")
        self.app = app
        self.kind = kind
        self.connections = 0
        self.per_ip: dict[str, int] = {}

    def buildProtocol(self, addr) -> SMTPServerProtocol:
        return SMTPServerProtocol(self)

    def admit(self, proto: SMTPServerProtocol) -> Reply | None:
        """Take a connection slot for `proto`, or say why not (421 and close)."""
        settings = self.app.settings
        limits = settings.smtp if self.kind == "smtp" else settings.submission
        ip = proto.ip
        held = self.per_ip.get(ip, 0)
        if held >= limits.max_per_ip:
            return replies.TOO_MANY_FROM_IP
        if self.connections >= limits.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if self.connections >= self.app.descriptors.share(settings, self.kind):
            return replies.OUT_OF_DESCRIPTORS
        self.connections += 1
        self.per_ip[ip] = held + 1
        proto.counted = True
        stats.connection_opened(self.app.stats, self.kind)
        return None

    def release(self, proto: SMTPServerProtocol) -> None:
        self.connections -= 1
        ip = proto.ip
        left = self.per_ip.get(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left
        else:
            self.per_ip.pop(ip, None)
        stats.connection_closed(self.app.stats, self.kind)

    def count_message(self) -> None:
        key = f"messages.{self.kind}.accepted"
        self.app.stats[key] = self.app.stats.get(key, 0) + 1


def listen_description(description: str) -> str:
    """The endpoint string with our listen backlog unless the operator chose one."""
    if description.startswith(_BACKLOG_TYPES) and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def build_endpoint(app, kind: str, description: str, reactor):
    """The SMTP listeners' endpoints (service.LISTENER_KINDS): a deeper accept queue."""
    return endpoints.serverFromString(reactor, listen_description(description))


def build_factory(app, kind: str):
    """The listener's factory; `submissions` (implicit TLS, RFC 8314) is wrapped in TLS."""
    factory = SMTPFactory(app, kind)
    if kind == "submission" and app.tls is None:
        # docs/SUBMISSION.md: no password travels in clear, so without a certificate only
        # trusted clients (RELAYCLIENT, POP-before-SMTP) can submit.
        loopback = app.settings.submission.auth_plaintext_loopback
        SMTPFactory.log.info(
            "submission: no [tls] certificate: AUTH {how}; other clients need RELAYCLIENT in "
            "the rules file or a POP-before-SMTP grant",
            how="offered in clear to loopback clients only" if loopback else "not offered")
    if kind != "submissions":
        return factory
    if app.tls is None:
        raise ConfigError("listen.submissions: needs a [tls] cert and key")
    from twisted.protocols.tls import TLSMemoryBIOFactory
    # The TLSContext is itself the connection creator: a reloaded certificate reaches new
    # connections without rebuilding the listener.
    return TLSMemoryBIOFactory(app.tls.options(), False, factory)
