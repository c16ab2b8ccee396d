"""SMTP AUTH and the submission policy for one SMTP session (the adapter side of RFC 4954/6409).

`SessionAuth` is created by the SMTP protocol for every connection and answers the core's
`Auth`/`AuthResponse` events, the MAIL policy and the From: check. It sees its session only
through a `SessionView` (below): the listener kind, the client address, the core's TLS and AUTH
state, the server's settings, clock, authenticator, penalty table and alias lookup, and whether
the client may relay. It never holds the protocol, so this module imports nothing above it
(smtp/protocol.py imports it, not the other way). What it does, as an operator sees it:

- Where AUTH is offered: on `submission` and `submissions`, and on `smtp` (port 25) only with
  `[smtp] auth = true`. It is offered (and accepted) only inside TLS: STARTTLS first, or the
  implicit-TLS `submissions` listener. Before STARTTLS, EHLO does not list AUTH and an AUTH
  command gets 538. `[submission] auth_plaintext_loopback = true` allows AUTH in clear on the
  submission listener from loopback clients (127.0.0.0/8, ::1) only, for local programs on a
  host without a certificate; never on port 25.
- Mechanisms PLAIN and LOGIN (sasl.py). The password is checked by app.authenticator (bcrypt
  in the thread pool) as `user@domain`, `user%domain` or `user` (default_domain).
- Abuse: every failed check raises the client address's penalty (access/penalty.py, one table
  with POP3: 2, 4, 8, 15 s); the 535 is sent only after that delay, and a new check from that
  address waits until the last answer was due. The third failure in one session is answered
  with 421 and the connection closes. Each failure is one log line for fail2ban::

      <time> smtp: auth failed: rip=192.0.2.7 user=<name> mech=PLAIN tls=yes delay=2s

  with the login name escaped; passwords and AUTH payloads are never logged.
- Submission needs AUTH (RFC 6409 section 4.3): on `submission`/`submissions`, MAIL from a
  session that is not authenticated gets 530, unless the client is trusted otherwise: a rules
  line with RELAYCLIENT, or a POP-before-SMTP grant. (Mail for local users from strangers
  belongs on port 25, where the normal rcpthosts rules apply.)
- Authenticated sessions may relay (access/relay_policy.py), skip the DNSBL (a user on a
  dial-up address listed in a policy list must still be able to send), and are bound to their
  addresses (`[submission] sender_binding`, default on; binding.py): MAIL FROM and every
  address in the From: header must be the user's own address or an alias pointing to it, else
  553. The null sender `<>` is allowed in MAIL FROM (a client sending a delivery report); its
  From: is still checked. A message without a From: field passes (it names nobody).
"""

from __future__ import annotations

import ipaddress
import sqlite3
from typing import Protocol

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailappliance.access.checkslot import CheckSlot
from mailappliance.access.penalty import LoginPenalty
from mailappliance.config import Settings
from mailappliance.pop3.core import escape_login
from mailappliance.smtp import replies, sasl
from mailappliance.smtp.binding import FromHeader, FromScanner, may_send_as
from mailappliance.smtp.core import Auth, AuthResponse, MailFrom, ServerConnection
from mailappliance.smtp.replies import Reply
from mailappliance.users.auth import Authenticator, login_address

# qmail-smtpd-auth closes after repeated failures too; three, as POP3 (pop3/core.py) and as
# login(1) counts. The per-IP penalty slows every attempt; this bounds one connection's share.
MAX_AUTH_FAILURES = 3
SUBMISSION_KINDS = frozenset({"submission", "submissions"})


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class SessionView(Protocol):
    """All `SessionAuth` may see of its SMTP session; the protocol adapter provides it.

    `settings` and `authenticator` are read at each use, so a reload reaches the next check."""

    @property
    def kind(self) -> str:
        """The listener: "smtp", "submission" or "submissions"."""

    @property
    def ip(self) -> str:
        """The client's address, normalised ("" when unknown)."""

    @property
    def core(self) -> ServerConnection:
        """The session's core: its TLS state (`tls`), AUTH offer and `authenticated` flag."""

    @property
    def tls_available(self) -> bool:
        """The server has a certificate, so STARTTLS can be offered."""

    @property
    def settings(self) -> Settings: ...

    @property
    def reactor(self) -> IReactorTime: ...

    @property
    def authenticator(self) -> Authenticator | None:
        """The password check, or None when this server checks no passwords."""

    @property
    def penalty(self) -> LoginPenalty:
        """The server's one login penalty table (shared with POP3)."""

    def may_relay(self) -> bool:
        """RELAYCLIENT, a POP-before-SMTP grant or AUTH entitle this client to relay."""

    def get_alias(self, address: str) -> list[str] | None:
        """The user store's alias lookup (raises sqlite3.Error or OSError when it fails)."""


class SessionAuth:
    log = Logger(namespace="mailappliance.smtp")

    __slots__ = ("session", "kind", "offered", "exchange", "mechanism", "failures", "user",
                 "_slot")

    def __init__(self, session: SessionView) -> None:
        self.session = session
        self.kind = session.kind
        # AUTH exists on this listener at all (before or after TLS).
        self.offered = self.kind in SUBMISSION_KINDS or session.settings.smtp.auth
        self.exchange: sasl.Exchange | None = None
        self.mechanism = ""
        self.failures = 0
        self.user = None                  # users.store.User once authenticated
        self._slot: CheckSlot | None = None   # the password check's turn (access/checkslot.py)

    # --- what the session offers ---------------------------------------------------------------

    def configure(self) -> None:
        """At connect: offer AUTH now (TLS already on, or clear text allowed) or after TLS."""
        session = self.session
        core = session.core
        if not self.offered or session.authenticator is None:
            return
        if core.tls or self._clear_text_allowed():
            core.auth_mechanisms = sasl.MECHANISMS
        elif session.tls_available:
            core.auth_after_tls = True

    def _clear_text_allowed(self) -> bool:
        return (self.kind in SUBMISSION_KINDS
                and self.session.settings.submission.auth_plaintext_loopback
                and _is_loopback(self.session.ip))

    def connection_lost(self) -> None:
        """A check still waiting for its turn leaves the queue (one running releases it)."""
        if self._slot is not None:
            self._slot.abandon()

    def _release(self, ok: bool | None) -> float:
        slot, self._slot = self._slot, None
        return 0.0 if slot is None else slot.release(ok)

    def tls_started(self) -> None:
        """The 220 to STARTTLS is out: what follows is encrypted, so AUTH is offered."""
        core = self.session.core
        if core.auth_after_tls:
            core.auth_mechanisms = sasl.MECHANISMS

    # --- the SASL exchange ---------------------------------------------------------------------

    def decide(self, ev) -> Reply | defer.Deferred:
        if type(ev) is Auth:
            self.exchange = sasl.Exchange(ev.mechanism)
            self.mechanism = ev.mechanism
            return self._step(self.exchange.start(ev.initial))
        exchange = self.exchange
        if type(ev) is not AuthResponse or exchange is None:     # cannot happen: the core
            return replies.AUTH_MALFORMED                        # sends 334 only through us
        return self._step(exchange.respond(ev.line))

    def _step(self, step) -> Reply | defer.Deferred:
        if isinstance(step, sasl.Challenge):
            return Reply(334, None, step.text)
        self.exchange = None
        if isinstance(step, sasl.Malformed):
            return replies.AUTH_MALFORMED
        return self._check(step)

    def _check(self, creds: sasl.Credentials) -> defer.Deferred:
        session = self.session
        ip = session.ip
        reactor = session.reactor
        table = session.penalty
        default_domain = session.settings.default_domain
        if creds.authzid and (login_address(creds.authzid, default_domain)
                              != login_address(creds.login, default_domain)):
            # RFC 4616: acting for another identity is not something we grant; fail like a
            # wrong password (same penalty, same wait).
            def check():
                return None
        else:
            def check():
                return session.authenticator.authenticate(creds.login, creds.password,
                                                          default_domain)
        # One check per address at a time, after its penalty (access/penalty.py's turns).
        self._slot = CheckSlot(table, reactor, ip)
        d = self._slot.wait()
        d.addCallback(lambda _: check())
        d.addCallbacks(self._checked, self._check_failed,
                       callbackArgs=(creds.login,), errbackArgs=(creds.login,))
        return d

    def _checked(self, user, login: str) -> Reply | defer.Deferred:
        session = self.session
        ip = session.ip
        reactor = session.reactor
        tls = "yes" if session.core.tls else "no"
        if user is None:
            delay = self._release(False)
            self.failures += 1
            # One line per failure, for fail2ban:
            #   failregex = ^\s*smtp: auth failed: rip=<HOST> user=   (conf/fail2ban)
            self.log.warn("auth failed: rip={ip} user=<{user}> mech={mech} tls={tls} "
                          "delay={delay:g}s", ip=ip, user=escape_login(login),
                          mech=self.mechanism, tls=tls, delay=delay)
            reply = (replies.AUTH_TOO_MANY_FAILURES if self.failures >= MAX_AUTH_FAILURES
                     else replies.AUTH_FAILED)
            return task.deferLater(reactor, delay, lambda: reply)
        self._release(True)
        self.user = user
        self.log.info("auth ok: rip={ip} user=<{user}> mech={mech} tls={tls}", ip=ip,
                      user=escape_login(user.address), mech=self.mechanism, tls=tls)
        return replies.AUTH_OK

    def _check_failed(self, failure, login: str) -> Reply:
        # The user store failed (disk, database): not the client's fault, no penalty.
        self._release(None)
        self.log.failure("auth: password check failed: rip={ip} user=<{user}>", failure,
                         ip=self.session.ip, user=escape_login(login))
        return replies.AUTH_TEMPORARY

    # --- MAIL and the From: header -------------------------------------------------------------

    def mail_refusal(self, ev: MailFrom) -> Reply | None:
        """530 for an untrusted session on submission; 553 for a sender not the user's."""
        session = self.session
        core = session.core
        if self.user is None or not core.authenticated:
            if self.kind in SUBMISSION_KINDS and not session.may_relay():
                self.log.info("refused MAIL on {kind}: rip={ip}: not authenticated",
                              kind=self.kind, ip=session.ip)
                if core.auth_after_tls and not core.tls:
                    return replies.AUTH_REQUIRED_STARTTLS
                return replies.AUTH_REQUIRED
            return None
        if not session.settings.submission.sender_binding or ev.sender is None:
            return None
        sender = str(ev.sender)
        try:
            ok = may_send_as(sender, self.user.address, session.get_alias)
        except (sqlite3.Error, OSError) as e:
            self.log.error("alias lookup failed: rip={ip}: {why}", ip=session.ip, why=str(e))
            return replies.SENDER_LOOKUP_FAILED
        if ok:
            return None
        self.log.info("refused sender: rip={ip} user=<{user}> from=<{sender}>: not the user's",
                      ip=session.ip, user=escape_login(self.user.address),
                      sender=escape_login(sender))
        return replies.sender_not_yours(self.user.address)

    def from_scanner(self) -> FromScanner | None:
        """A scanner for the message about to start, when its From: must be checked."""
        if self.user is not None and self.session.settings.submission.sender_binding:
            return FromScanner()
        return None

    def from_refusal(self, header: FromHeader) -> Reply | None:
        user = self.user
        session = self.session
        if header.unreadable:
            self.log.info("refused message: rip={ip} user=<{user}>: unreadable From: header",
                          ip=session.ip, user=escape_login(user.address))
            return replies.FROM_HEADER_UNREADABLE
        for address in header.addresses:
            try:
                ok = may_send_as(address, user.address, session.get_alias)
            except (sqlite3.Error, OSError) as e:
                self.log.error("alias lookup failed: rip={ip}: {why}", ip=session.ip,
                               why=str(e))
                return replies.SENDER_LOOKUP_FAILED
            if not ok:
                self.log.info("refused message: rip={ip} user=<{user}> header-from=<{addr}>:"
                              " not the user's", ip=session.ip,
                              user=escape_login(user.address), addr=escape_login(address))
                return replies.from_header_not_yours(user.address)
        return None
