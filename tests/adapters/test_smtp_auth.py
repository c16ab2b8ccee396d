"""SMTP AUTH, the submission policy and sender binding in the SMTP adapter, with Twisted doubles:
StringTransport clients (STARTTLS recorded, not performed), a MemoryReactorClock for the login
penalty's waits, the real user store, the real Authenticator over a synchronous thread pool and
the real queue injector, so "235", "535" and "250 ok" are checked against what happened."""

from __future__ import annotations

import base64
import sqlite3
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent

from mailappliance.access import penalty as login_penalty
from mailappliance.access.dnsbl import Refusal
from mailappliance.address import split_path
from mailappliance.config import Settings, SubmissionSettings
from mailappliance.smtp import replies
from mailappliance.smtp.core import Auth, MailFrom, ServerConnection
from mailappliance.smtp.service import build_factory
from mailappliance.smtp.submission import SessionAuth
from tests.adapters.test_smtp_protocol import PASSWORD, World, codes

ALICE = "alice@test.com"
GOOD_PLAIN = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
BAD_PLAIN = base64.b64encode(f"\0{ALICE}\0wrong-Password-1".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class TLSTransport(StringTransport):
    """Records startTLS; the bytes after it stand for what arrives through the TLS layer."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tls_options = None

    def startTLS(self, options):
        self.tls_options = options


class Sub(World):
    """World with an authenticator and TLS, listening as `kind` (submission by default)."""

    def __init__(self, tmp_path, kind="submission", *, tls=True, submission_settings=None,
                 **smtp):
        super().__init__(tmp_path, fields={
            "default_domain": "test.com",
            "submission": submission_settings or SubmissionSettings()}, **smtp)
        self.app.tls = SimpleNamespace(options=lambda: "tls-options") if tls else None
        self.store.add_user("bob@test.com", PASSWORD)
        self.store.add_alias("shared@test.com", ["bob@test.com"])
        self.kind = kind
        factory = build_factory(self.app, kind)
        self.factory = getattr(factory, "wrappedFactory", factory)   # submissions: unwrapped

    def connect(self, ip="192.0.2.5") -> "Conn":
        return Conn(self.factory, ip)


class Conn:
    def __init__(self, factory, ip):
        addr = (IPv6Address if ":" in ip else IPv4Address)("TCP", ip, 40000)
        self.proto = factory.buildProtocol(addr)
        self.transport = TLSTransport(peerAddress=addr)
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> str:
        value = self.transport.value().decode()
        self.transport.clear()
        return value

    def chat(self, data: bytes) -> str:
        self.proto.dataReceived(data)
        return self.take()

    def starttls(self) -> str:
        out = self.chat(b"EHLO c\r\nSTARTTLS\r\n")
        assert out.endswith("220 2.0.0 ready to start TLS\r\n")
        assert self.transport.tls_options == "tls-options"
        return self.chat(b"EHLO c\r\n")

    def login(self, plain: str = GOOD_PLAIN) -> str:
        return self.chat(f"AUTH PLAIN {plain}\r\n".encode())

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def ehlo_auth_line(ehlo: str) -> str | None:
    return next((line[4:] for line in ehlo.split("\r\n") if line[4:].startswith("AUTH")), None)


# --- where AUTH is offered ------------------------------------------------------------------------

def test_submission_offers_auth_only_after_starttls(tmp_path):
    w = Sub(tmp_path)
    c = w.connect()
    ehlo = c.chat(b"EHLO c\r\n")
    assert "STARTTLS" in ehlo and ehlo_auth_line(ehlo) is None
    assert c.chat(f"AUTH PLAIN {GOOD_PLAIN}\r\n".encode()) == (
        "538 5.7.11 sorry, encryption required for authentication; say STARTTLS first"
        " (#5.7.11)\r\n")
    assert c.chat(b"MAIL FROM:<alice@test.com>\r\n") == (
        "530 5.7.0 sorry, authentication required; say STARTTLS, then AUTH (#5.7.0)\r\n")
    ehlo = c.starttls()
    assert ehlo_auth_line(ehlo) == "AUTH PLAIN LOGIN"
    assert c.login() == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"
    assert ehlo_auth_line(c.chat(b"EHLO c\r\n")) is None          # nothing more to offer


def test_implicit_tls_submissions_offers_auth_at_once(tmp_path):
    from mailappliance.config import TLSSettings
    from mailappliance.tls import TLSContext
    from tests.pop3_support import make_cert
    cert, key = make_cert(tmp_path / "tls")
    w = Sub(tmp_path, "smtp")
    w.app.tls = TLSContext(TLSSettings(cert=cert, key=key))
    w.factory = build_factory(w.app, "submissions").wrappedFactory
    c = w.connect()
    ehlo = c.chat(b"EHLO c\r\n")
    assert ehlo_auth_line(ehlo) == "AUTH PLAIN LOGIN" and "STARTTLS" not in ehlo
    assert c.login() == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"


def test_port_25_never_offers_auth_unless_enabled(tmp_path):
    w = Sub(tmp_path, "smtp")
    c = w.connect()
    assert ehlo_auth_line(c.starttls()) is None
    assert c.login() == "502 5.5.1 unimplemented (#5.5.1)\r\n"
    # Port 25 takes mail for local users without AUTH, as always.
    assert codes(c.chat(b"MAIL FROM:<x@remote.example>\r\nRCPT TO:<alice@test.com>\r\n")) \
        == [250, 250]

    w = Sub(tmp_path / "on", "smtp", auth=True)
    c = w.connect()
    assert ehlo_auth_line(c.chat(b"EHLO c\r\n")) is None          # still only inside TLS
    assert ehlo_auth_line(c.starttls()) == "AUTH PLAIN LOGIN"
    assert c.login() == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"


def test_plaintext_auth_from_loopback_only_when_allowed(tmp_path):
    allow = SubmissionSettings(auth_plaintext_loopback=True)
    w = Sub(tmp_path, tls=False, submission_settings=allow)
    local = w.connect("127.0.0.7")
    assert ehlo_auth_line(local.chat(b"EHLO c\r\n")) == "AUTH PLAIN LOGIN"
    assert local.login() == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"
    local6 = w.connect("::1")
    assert ehlo_auth_line(local6.chat(b"EHLO c\r\n")) is not None
    remote = w.connect("192.0.2.9")
    assert ehlo_auth_line(remote.chat(b"EHLO c\r\n")) is None
    assert remote.login() == "502 5.5.1 unimplemented (#5.5.1)\r\n"   # no TLS here at all
    assert remote.chat(b"MAIL FROM:<alice@test.com>\r\n") == \
        "530 5.7.0 sorry, authentication required (#5.7.0)\r\n"

    # Off (the default): loopback gets no clear-text AUTH either.
    w = Sub(tmp_path / "off")
    c = w.connect("127.0.0.7")
    assert ehlo_auth_line(c.chat(b"EHLO c\r\n")) is None
    assert c.login().startswith("538 ")

    # Never on port 25, even with [smtp] auth.
    w = Sub(tmp_path / "25", "smtp", submission_settings=allow, auth=True)
    c = w.connect("127.0.0.7")
    assert ehlo_auth_line(c.chat(b"EHLO c\r\n")) is None


# --- the exchange -----------------------------------------------------------------------------------

def test_auth_login_exchange(tmp_path):
    w = Sub(tmp_path)
    c = w.connect()
    c.starttls()
    assert c.chat(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n"
    assert c.chat(f"{b64('alice')}\r\n".encode()) == "334 UGFzc3dvcmQ6\r\n"   # default domain
    assert c.chat(f"{b64(PASSWORD)}\r\n".encode()) == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"
    assert c.proto.auth.user.address == ALICE


def test_auth_plain_with_empty_challenge_and_pipelined_mail(tmp_path):
    w = Sub(tmp_path)
    c = w.connect()
    c.starttls()
    assert c.chat(b"AUTH PLAIN\r\n") == "334 \r\n"
    out = c.chat(f"{GOOD_PLAIN}\r\nMAIL FROM:<alice@test.com>\r\n".encode())
    assert codes(out) == [235, 250]


def test_malformed_and_cancelled_exchanges_then_success(tmp_path):
    w = Sub(tmp_path)
    c = w.connect()
    c.starttls()
    assert c.chat(b"AUTH PLAIN !!!\r\n") == "501 5.5.2 malformed auth input (#5.5.4)\r\n"
    assert c.chat(b"AUTH LOGIN\r\n").startswith("334 ")
    assert c.chat(b"*\r\n") == "501 5.0.0 auth exchange cancelled (#5.0.0)\r\n"
    assert c.chat(b"AUTH CRAM-MD5\r\n").startswith("504 ")
    assert c.login() == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"
    assert c.proto.auth.failures == 0


def test_authzid_for_someone_else_fails(tmp_path):
    w = Sub(tmp_path)
    c = w.connect()
    c.starttls()
    c.proto.dataReceived(f"AUTH PLAIN {b64(f'bob@test.com{chr(0)}{ALICE}{chr(0)}{PASSWORD}')}"
                         "\r\n".encode())
    w.reactor.advance(login_penalty.PENALTY_INIT)
    assert c.take() == "535 5.7.8 authorization failed (#5.7.0)\r\n"
    same = b64(f"alice\0{ALICE}\0{PASSWORD}")                   # alice == alice@test.com
    w.reactor.advance(100)
    assert c.login(same) == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"


# --- failures: penalty, three strikes, log lines --------------------------------------------------

def test_failed_logins_are_delayed_logged_and_the_third_closes(tmp_path):
    w = Sub(tmp_path)
    c = w.connect("192.0.2.77")
    c.starttls()
    with capturedLogs() as events:
        answers = []
        for expected_delay in (2.0, 4.0, 8.0):
            c.proto.dataReceived(f"AUTH PLAIN {BAD_PLAIN}\r\n".encode())
            w.reactor.advance(expected_delay - 0.01)
            assert c.take() == ""                                  # not before the delay
            w.reactor.advance(0.01)
            answers.append(c.take())
    assert answers == ["535 5.7.8 authorization failed (#5.7.0)\r\n"] * 2 + [
        "421 4.7.0 sorry, too many authentication failures, closing connection (#4.7.0)\r\n"]
    assert c.closed
    lines = [formatEvent(e) for e in events if "auth failed" in e.get("log_format", "")]
    assert lines == [f"auth failed: rip=192.0.2.77 user=<{ALICE}> mech=PLAIN tls=yes "
                     f"delay={d}s" for d in (2, 4, 8)]
    texts = " ".join(formatEvent(e) + repr(e) for e in events)
    assert PASSWORD not in texts and "wrong-Password-1" not in texts and BAD_PLAIN not in texts


def test_penalty_is_per_ip_across_connections_and_shared_with_pop3(tmp_path):
    w = Sub(tmp_path)
    first = w.connect("192.0.2.8")
    first.starttls()
    first.proto.dataReceived(f"AUTH PLAIN {BAD_PLAIN}\r\n".encode())
    # A second connection from the same address waits until the first answer was due, even
    # with the right password; another address does not wait.
    second = w.connect("192.0.2.8")
    second.starttls()
    second.proto.dataReceived(f"AUTH PLAIN {GOOD_PLAIN}\r\n".encode())
    other = w.connect("192.0.2.9")
    other.starttls()
    assert other.login() == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"
    assert second.take() == ""
    w.reactor.advance(login_penalty.PENALTY_INIT)
    assert first.take().startswith("535 ")
    assert second.take() == "235 2.7.0 ok, go ahead (#2.0.0)\r\n"
    # The table is the server's one table: POP3 (pop3/service.py) on the same App uses it.
    from mailappliance.pop3.service import _shared_for
    assert _shared_for(w.app).penalty is w.app.login_penalty


def test_escaped_login_name_in_the_log(tmp_path):
    w = Sub(tmp_path)
    c = w.connect("192.0.2.10")
    c.starttls()
    evil = "x\r\nsmtp: auth ok: rip=1.2.3.4 <\x1b>"
    with capturedLogs() as events:
        c.proto.dataReceived(f"AUTH PLAIN {b64(chr(0) + evil + chr(0) + 'pw-Wrong-1')}"
                             "\r\n".encode())
        w.reactor.advance(login_penalty.PENALTY_INIT)
    [line] = [formatEvent(e) for e in events if "auth failed" in e.get("log_format", "")]
    assert line == ("auth failed: rip=192.0.2.10 user=<x\\x0d\\x0asmtp:\\x20auth\\x20ok:"
                    "\\x20rip=1.2.3.4\\x20\\x3c\\x1b\\x3e> mech=PLAIN tls=yes delay=2s")


def test_store_failure_is_454_without_penalty(tmp_path):
    w = Sub(tmp_path)

    class Broken:
        def authenticate(self, login, password, default_domain=None):
            return defer.fail(sqlite3.OperationalError("disk I/O error"))
    w.app.authenticator = Broken()
    c = w.connect("192.0.2.11")
    c.starttls()
    assert c.login() == "454 4.7.0 temporary authentication failure (#4.3.0)\r\n"
    assert w.app.login_penalty.steps("192.0.2.11", w.reactor.seconds()) == 0


# --- relaying and the submission policy -------------------------------------------------------------

MESSAGE = b"From: Alice <alice@test.com>\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"


def test_authenticated_session_relays_and_is_marked_esmtpsa(tmp_path):
    w = Sub(tmp_path)
    c = w.connect()
    c.starttls()
    c.login()
    out = c.chat(b"MAIL FROM:<alice@test.com>\r\nRCPT TO:<far@remote.example>\r\nDATA\r\n")
    assert codes(out) == [250, 250, 354]
    assert c.chat(MESSAGE).startswith("250 2.0.0 ok ")
    [(sender, rcpts, message)] = w.queued()
    assert (sender, rcpts) == (ALICE, ["far@remote.example"])
    assert b"with ESMTPSA;" in message


def test_unauthenticated_submission_is_refused_unless_trusted(tmp_path):
    w = Sub(tmp_path, rules='192.0.2.4:allow,RELAYCLIENT=""\n')
    c = w.connect("192.0.2.5")
    c.starttls()
    assert c.chat(b"MAIL FROM:<a@b.example>\r\n") == \
        "530 5.7.0 sorry, authentication required (#5.7.0)\r\n"
    trusted = w.connect("192.0.2.4")                 # RELAYCLIENT from the rules file
    assert codes(trusted.chat(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                              b"RCPT TO:<x@remote.example>\r\n")) == [250, 250, 250]
    w.app.grants.grant("192.0.2.6", 60)              # POP-before-SMTP
    roaming = w.connect("192.0.2.6")
    assert codes(roaming.chat(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")) == [250, 250]


def test_authenticated_session_skips_the_dnsbl(tmp_path):
    w = Sub(tmp_path)
    listed = Refusal(False, "listed at bl.example")
    w.app.dnsbl = SimpleNamespace(check=lambda ip, env: defer.succeed(listed))
    c = w.connect()
    c.starttls()
    c.login()
    assert codes(c.chat(b"MAIL FROM:<alice@test.com>\r\nRCPT TO:<far@remote.example>\r\n")) \
        == [250, 250]
    port25 = Sub(tmp_path / "25", "smtp")
    port25.app.dnsbl = w.app.dnsbl
    c = port25.connect()
    assert c.chat(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@test.com>\r\n").endswith(
        "250 ok\r\n451 listed at bl.example\r\n")        # as rblsmtpd: refused at RCPT


# --- sender binding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sender, code", [
    ("alice@test.com", 250),
    ("ALICE@TEST.COM", 250),
    ("sales@test.com", 250),          # alias -> alice
    ("postmaster@test.com", 250),     # role alias -> the domain's first user, alice
    ("", 250),                        # null sender: a delivery report from the client
    ("bob@test.com", 553),
    ("shared@test.com", 553),         # alias -> bob, not alice
    ("alice@remote.example", 553),
])
def test_mail_from_must_be_the_users(tmp_path, sender, code):
    w = Sub(tmp_path)
    c = w.connect()
    c.starttls()
    c.login()
    out = c.chat(f"MAIL FROM:<{sender}>\r\n".encode())
    assert codes(out) == [code]
    if code == 553:
        assert out == ("553 5.7.1 sorry, that sender address is not yours; you are logged in as"
                       " alice@test.com, use it or one of its aliases (#5.7.1)\r\n")


@pytest.mark.parametrize("header, accepted", [
    (b"From: Alice <alice@test.com>\r\n", True),
    (b"From: sales@test.com\r\n", True),
    (b"Subject: no from at all\r\n", True),
    (b"From: Bob <bob@test.com>\r\n", False),
    (b"From: alice@test.com,\r\n bob@test.com\r\n", False),    # every address counts
    (b"From: Alice <alice@test.com>\r\nFrom: ceo@bank.example\r\n", False),
    (b"from : ceo@bank.example\r\n", False),
    (b"From: nobody-at-all\r\n", False),
])
def test_from_header_must_be_the_users(tmp_path, header, accepted):
    w = Sub(tmp_path)
    c = w.connect()
    c.starttls()
    c.login()
    c.chat(b"MAIL FROM:<alice@test.com>\r\nRCPT TO:<far@remote.example>\r\nDATA\r\n")
    # Header split across several reads, a body line that looks like a header.
    c.proto.dataReceived(header[:7])
    c.proto.dataReceived(header[7:] + b"Subject: x\r\n\r\nFrom: ceo@bank.example\r\n")
    out = c.chat(b"end\r\n.\r\n")
    if accepted:
        assert out.startswith("250 2.0.0 ok ") and len(w.queued()) == 1
    else:
        assert codes(out) == [553] and w.queued() == []
        assert "From: header" in out
    # The session goes on either way.
    assert c.chat(b"NOOP\r\n") == "250 2.0.0 ok\r\n"


def test_binding_off_lets_any_sender_through(tmp_path):
    w = Sub(tmp_path, submission_settings=SubmissionSettings(sender_binding=False))
    c = w.connect()
    c.starttls()
    c.login()
    c.chat(b"MAIL FROM:<bob@test.com>\r\nRCPT TO:<far@remote.example>\r\nDATA\r\n")
    assert c.chat(b"From: ceo@bank.example\r\n\r\nx\r\n.\r\n").startswith("250 ")


def test_unauthenticated_port_25_mail_is_not_bound(tmp_path):
    w = Sub(tmp_path, "smtp")
    c = w.connect()
    c.chat(b"HELO c\r\nMAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\n")
    assert c.chat(b"From: ceo@bank.example\r\n\r\nx\r\n.\r\n").startswith("250 ")
    assert c.proto._from_scan is None



def test_submission_without_certificate_says_so_at_start(tmp_path):
    with capturedLogs() as events:
        Sub(tmp_path, tls=False)
        Sub(tmp_path / "lo", tls=False,
            submission_settings=SubmissionSettings(auth_plaintext_loopback=True))
        Sub(tmp_path / "tls")
    lines = [formatEvent(e) for e in events if "no [tls] certificate" in e.get("log_format", "")]
    assert lines == [
        "submission: no [tls] certificate: AUTH not offered; other clients need RELAYCLIENT in "
        "the rules file or a POP-before-SMTP grant",
        "submission: no [tls] certificate: AUTH offered in clear to loopback clients only; "
        "other clients need RELAYCLIENT in the rules file or a POP-before-SMTP grant"]


# --- SessionAuth on its own: a SessionView is all it needs --------------------------------------

class FakeSession:
    """The narrowest thing SessionAuth accepts: the members of submission.SessionView, no protocol,
    no app, no factory (a SessionAuth reaching for anything else fails with AttributeError)."""

    __slots__ = ("kind", "ip", "core", "tls_available", "settings", "reactor", "authenticator",
                 "penalty", "relay", "aliases")

    def __init__(self, tmp_path, kind="submission", *, users=None, relay=False):
        self.kind = kind
        self.ip = "192.0.2.9"
        self.core = ServerConnection("mx.test.com", databytes=1000, max_recipients=10)
        self.tls_available = True
        self.settings = Settings(hostname="mx.test.com", data=tmp_path, default_domain="test.com")
        self.reactor = Clock()
        users = users or {}
        self.authenticator = SimpleNamespace(
            authenticate=lambda login, password, domain: users.get((login, password)))
        self.penalty = login_penalty.LoginPenalty()
        self.relay = relay
        self.aliases = {"shared@test.com": [ALICE]}

    def may_relay(self) -> bool:
        return self.relay

    def get_alias(self, address):
        return self.aliases.get(address)


def test_session_auth_works_through_the_view_alone(tmp_path):
    alice = SimpleNamespace(address=ALICE)
    view = FakeSession(tmp_path, users={(ALICE, PASSWORD): alice})
    auth = SessionAuth(view)
    auth.configure()
    assert (view.core.auth_mechanisms, view.core.auth_after_tls) == ((), True)
    mail = MailFrom(split_path("<alice@test.com>", null_ok=True)[0], None, None, None)
    assert auth.mail_refusal(mail) == replies.AUTH_REQUIRED_STARTTLS
    view.core.tls = True
    auth.tls_started()
    assert view.core.auth_mechanisms == ("PLAIN", "LOGIN")

    # A wrong password: penalty in the view's table, 535 only after the delay on its clock.
    d = auth.decide(Auth("PLAIN", BAD_PLAIN))
    assert isinstance(d, defer.Deferred)
    got = []
    d.addCallback(got.append)
    assert got == [] and view.penalty.steps(view.ip, view.reactor.seconds()) == 1
    view.reactor.advance(login_penalty.PENALTY_INIT)
    assert got == [replies.AUTH_FAILED] and auth.failures == 1

    # The right one, once the 535 was due: 235, and MAIL is bound to alice and her aliases.
    ok = []
    auth.decide(Auth("PLAIN", GOOD_PLAIN)).addCallback(ok.append)
    assert ok == [replies.AUTH_OK] and auth.user is alice
    view.core.authenticated = True
    assert auth.mail_refusal(mail) is None
    shared = MailFrom(split_path("<shared@test.com>", null_ok=True)[0], None, None, None)
    assert auth.mail_refusal(shared) is None
    bob = MailFrom(split_path("<bob@test.com>", null_ok=True)[0], None, None, None)
    assert auth.mail_refusal(bob) == replies.sender_not_yours(ALICE)


def test_trusted_client_may_submit_without_auth_through_the_view(tmp_path):
    mail = MailFrom(split_path("<anyone@remote.example>", null_ok=True)[0], None, None, None)
    assert SessionAuth(FakeSession(tmp_path, relay=True)).mail_refusal(mail) is None
    assert SessionAuth(FakeSession(tmp_path, relay=False)).mail_refusal(mail).code == 530
    assert SessionAuth(FakeSession(tmp_path, "smtp", relay=False)).mail_refusal(mail) is None
