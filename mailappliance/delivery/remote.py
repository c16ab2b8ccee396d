"""Remote delivery (qmail-remote): the recipients of one message at one domain, over SMTP.

* Where to: ``[routes]`` (qmail's smtproutes) first, ``host[:port]``; otherwise the domain's MX
  hosts from app.resolver (preference order, random among equals, implicit MX = the domain's
  own A/AAAA).  Null MX (RFC 7505) and NXDOMAIN are permanent, SERVFAIL and timeouts
  temporary.
* The MX-points-to-us loop, as qmail-remote: if one of the MX hosts is this machine, only the
  hosts with a strictly better preference are tried; if there are none, the recipients fail
  with qmail's "Although I'm listed as a best-preference MX ..." text.  (A routed domain is
  never checked: the operator said where to send it.)
* One SMTP connection per address, through the sans-IO client (smtp/client.py), with a
  connect timeout (settings.queue.connect_timeout, qmail's timeoutconnect) and a deadline per
  reply that trickling cannot stretch: each reply must be complete within its RFC 5321
  4.5.3.2 limit (client.REPLY_DEADLINES, capped by settings.queue.reply_timeout) of the moment
  we began to wait for it, and the message earns time only as fast as the server takes it
  (deadline.MIN_DATA_RATE).  The whole attempt, every address included, ends after
  ATTEMPT_LIFETIME.  A deadline passing is a deferral that names the host and the reply
  ("Connected to 192.0.2.1 but it sent its greeting too slowly: ...").  A host that cannot be
  reached, greets badly, is too slow or dies before MAIL makes us try the next address and
  host; once a transaction has started, its per-recipient results stand.
* The message is read, in a thread, from the source the queue manager hands over
  (delivery/interfaces.py IMessageSource) and streamed with flow control; it is
  CRLF-normalised and dot-stuffed on the way out (client.DataEncoder).  A message with a line
  over RFC 5321's 1000 octets is re-encoded first (reencode.py; mail we sign already was, at
  injection, before signing: docs/LIMITS.md "Long lines").
* STARTTLS when the server offers it, never required (Postfix's smtp_tls_security_level =
  may): TLS 1.2 at least, SNI with the MX host name, and the certificate is checked -- chain
  against the system's CAs (SSL_CERT_FILE / SSL_CERT_DIR are honoured), name with
  service-identity against the MX host name (or the IP address of a route to an address) --
  but a failed check only shows in the log line of the handshake::

      remote: TLS with mx.example.org[192.0.2.25]: TLSv1.3 TLS_AES_256_GCM_SHA384, certificate verified
      remote: TLS with 192.0.2.26[192.0.2.26]: TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384, certificate not verified: self-signed certificate
"""

from __future__ import annotations

import ipaddress
import os
from typing import Callable

from twisted.internet import defer, error
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import (
    IHandshakeListener, IOpenSSLClientConnectionCreator, IPushProducer)

from mailappliance.deadline import MIN_DATA_RATE, Deadline
from mailappliance.delivery.interfaces import IMessageSource, IRemoteDeliverer
from mailappliance.envelope import Envelope, Result, deferral, failure
from mailappliance.reencode import MAX_LINE, LongLineScanner, fit_lines
from mailappliance.smtp import client as smtp_client
from mailappliance.smtp.client import ClientCore, Close, DataEncoder, Send, SendBody, StartTLS

SMTP_PORT = 25
# Messages up to this size are read into memory in one thread call before connecting;
# larger ones are streamed in the message source's chunks with flow control.
PRELOAD_MAX = 256 * 1024
# Addresses tried per attempt (qmail-remote tries every address of every MX; a domain with
# dozens of MX addresses would tie up a remote slot for connect_timeout times that many).
MAX_ADDRESSES = 16
# A delivery attempt (every address tried for one message's recipients at one domain) ends
# this long after it began, whatever its servers do.  Per-reply deadlines alone would let a
# server that answers each of 100 pipelined RCPTs just in time, or 16 MX addresses that each
# trickle a greeting, hold a remote slot for hours.  An hour is what our own server gives an
# SMTP session (deadline.SMTP_SESSION_LIFETIME: a 10 MiB message at 3 KB/s) and more than one
# conversation's reply deadlines add up to for one recipient (42 min), so an honest slow server
# is not cut off; chasquid gives a connection 10 minutes, mox 30.  It ends as a deferral.
ATTEMPT_LIFETIME = 3600
# A stored message with a line over RFC 5321's limit is re-encoded for sending (reencode.py;
# docs/LIMITS.md "Long lines"). One larger than PRELOAD_MAX is then held whole in memory for
# its delivery: this many at once. Each is at most [smtp] databytes (10 MiB by default) and up
# to three times that as quoted-printable of 8-bit text: 60 MiB of the unit's MemoryMax=512M.
REFIT_AT_ONCE = 2
# Whether a message over PRELOAD_MAX has such a line is found by reading it through once, and
# remembered for this many messages (by queue id and token, about 100 bytes each), so its
# attempts at other domains and its retries do not read it twice each.
LONG_LINE_MEMORY = 4096

T_NO_HOST = "Sorry, I couldn't find any host named {domain}. (#5.1.2)"
T_DNS_TEMP = "Sorry, I couldn't find any host by that name: {why} (#4.1.2)"
T_NO_CONNECTION = "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)"
T_LOOP = ("Sorry. Although I'm listed as a best-preference MX or A for that host,\n"
          "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)")
# The list of unreachable addresses appended to T_NO_CONNECTION is cut to this many characters
# (MAX_ADDRESSES addresses with their errors fit easily).
UNREACHABLE_TEXT_MAX = 900


def local_addresses() -> set[str]:
    """This machine's addresses, as qmail's ipme: IPv4 from /proc/net/fib_trie (LOCAL
    entries), IPv6 from /proc/net/if_inet6.  Loopback and unspecified are always "me"."""
    found: set[str] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            last = None
            for line in f:
                line = line.strip()
                if line.startswith("|--"):
                    last = line[3:].strip()
                elif "/32 host LOCAL" in line and last:
                    found.add(last)
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def make_is_me(extra: set[str] | None = None) -> Callable[[str], bool]:
    mine = local_addresses() | (extra or set())

    def is_me(ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return addr.is_loopback or addr.is_unspecified or str(addr) in mine
    return is_me


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


@implementer(IPushProducer, IHandshakeListener)
class _SMTPClientProtocol(Protocol):
    """Runs one ClientCore over a connection; `finished` fires with the core at the end."""

    def __init__(self, deliverer: "RemoteDeliverer", core: ClientCore, env: Envelope,
                 messages: IMessageSource, preloaded: bytes | None,
                 server_name: str | None = None, ends: float | None = None) -> None:
        self.d = deliverer
        self.core = core
        self.env = env
        self.messages = messages
        self.preloaded = preloaded
        self.server_name = server_name    # the MX (or route) host name, for SNI and the check
        self.tls = None                   # the connection creator once STARTTLS began
        self.finished: defer.Deferred = defer.Deferred()
        self._timer = None
        self._paused = False
        self._resume: defer.Deferred | None = None
        self._sending = False
        self.ends = ends                  # the whole attempt's end (reactor seconds)
        self._deadline: Deadline | None = None
        self._mark: tuple | None = None   # (replies received, what we wait for) last seen
        self._lost = False

    # -- deadlines (deadline.py: one per reply, the message's rate, the attempt's lifetime) -------
    def _stage_seconds(self, stage: str) -> float:
        return min(smtp_client.REPLY_DEADLINES[stage], self.d.reply_timeout)

    def _progress(self) -> None:
        """A reply was complete or the conversation moved on: the next wait gets its own
        deadline. Bytes that complete nothing never get here, so they earn nothing."""
        core = self.core
        if self._lost or self._deadline is None or core.done or core.awaiting is None:
            return
        mark = (core.replies_received, core.awaiting)
        if mark == self._mark:
            return
        self._mark = mark
        now = self.d.reactor.seconds()
        self._deadline.request_done(now, self._stage_seconds(core.awaiting))
        self._rearm(now)

    def _moved(self, nbytes: int) -> None:
        """Message bytes the server took: time at deadline.MIN_DATA_RATE (the timer is lazy:
        it finds the later deadline when it fires)."""
        if self._deadline is not None:
            self._deadline.moved(self.d.reactor.seconds(), nbytes)

    def _rearm(self, now: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.d.reactor.callLater(self._deadline.remaining(now), self._check)

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline
        if self._lost:
            return
        if self.core.done:
            # We closed, but the connection lingers (a peer that reads nothing keeps our last
            # bytes unsent): the last deadline ends it too.
            self.transport.abortConnection()
            return
        now = self.d.reactor.seconds()
        if not deadline.expired(now):
            self._timer = self.d.reactor.callLater(deadline.remaining(now), self._check)
            return
        whole = deadline.over_lifetime(now)
        seconds = self.d.attempt_lifetime if whole else deadline.timeout
        stage = self.core.awaiting
        self.core.deadline_passed(seconds, whole_attempt=whole)
        self.d.log.info("remote: {ip} too slow: {what} deadline of {s} s passed",
                        ip=self.core.host, what="attempt" if whole else stage, s=seconds)
        self._sending = False
        self.transport.abortConnection()

    # -- protocol -------------------------------------------------------------------------------
    def connectionMade(self) -> None:
        now = self.d.reactor.seconds()
        ends = self.ends if self.ends is not None else now + self.d.attempt_lifetime
        self._deadline = Deadline(self._stage_seconds("greeting"), now, ends - now,
                                  MIN_DATA_RATE)
        self._mark = (self.core.replies_received, self.core.awaiting)
        self._rearm(now)

    def dataReceived(self, data: bytes) -> None:
        self._do(self.core.receive_data(data))
        self._progress()

    def _do(self, actions) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.transport.write(a.data)
            elif isinstance(a, StartTLS):
                try:
                    self.tls = self.d.tls_options(self.server_name or self.core.host)
                    self.transport.startTLS(self.tls)
                except Exception as e:  # noqa: BLE001 - no TLS after all: give up on it
                    self.d.log.warn("remote: STARTTLS with {host} failed: {why}",
                                    host=self.core.host, why=str(e))
                    self.transport.abortConnection()
                    return
                self._do(self.core.tls_started())
            elif isinstance(a, SendBody):
                self._sending = True
                self._send_body().addErrback(self._body_failed)
            elif isinstance(a, Close):
                self._sending = False
                self.transport.loseConnection()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: log what the TLS session is and whether the certificate checked
        out (it is never a reason to stop: opportunistic TLS)."""
        report = getattr(self.tls, "report", None)
        if report is None:
            return
        version, cipher, verdict = report()
        self.d.log.info("remote: TLS with {name}[{ip}]: {version} {cipher}, certificate {verdict}",
                        name=self.server_name or self.core.host, ip=self.core.host,
                        version=version, cipher=cipher, verdict=verdict)

    @defer.inlineCallbacks
    def _send_body(self):
        enc = DataEncoder()
        if self.preloaded is not None:
            self.transport.write(enc.encode(self.preloaded) + enc.finish())
            self._moved(len(self.preloaded))
        else:
            self.transport.registerProducer(self, True)
            reader = yield self.d._defer(self.messages.open_message, self.env)
            try:
                while self._sending:
                    if self._paused:
                        self._resume = defer.Deferred()
                        yield self._resume
                        continue
                    chunk = yield self.d._defer(reader.read)
                    if not self._sending:
                        return
                    if not chunk:
                        break
                    self.transport.write(enc.encode(chunk))
                    self._moved(len(chunk))
                if not self._sending:
                    return
                self.transport.write(enc.finish())
            finally:
                yield self.d._defer(reader.close)
                self.transport.unregisterProducer()
        if self._lost:
            return
        self._sending = False
        self.core.body_done()
        self._progress()

    def _body_failed(self, f) -> None:
        self.d.log.error("remote: cannot read msg {qid} while sending: {why}",
                         qid=self.env.qid, why=f.getErrorMessage())
        self._sending = False
        self.transport.abortConnection()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        d, self._resume = self._resume, None
        if d is not None:
            d.callback(None)

    def stopProducing(self) -> None:
        self._sending = False
        self.resumeProducing()

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._sending = False
        self.resumeProducing()
        self.core.connection_lost()
        if not self.finished.called:
            self.finished.callback(self.core)


class _Factory(ClientFactory):
    noisy = False         # no "Starting factory" lines per delivery in the mail log
    def __init__(self, proto: _SMTPClientProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.proto.finished.called:
            self.proto.finished.errback(reason)


@implementer(IRemoteDeliverer)
class RemoteDeliverer:
    log = Logger()

    def __init__(self, reactor, resolver, threadpool, *, hostname: str,
                 route_for: Callable[[str], object] = lambda domain: None,
                 connect_timeout: float = 60, reply_timeout: float = 600,
                 attempt_lifetime: float = ATTEMPT_LIFETIME,
                 tls_options: Callable[[str], object] | None = None,
                 is_me: Callable[[str], bool] | None = None, mx_port: int = SMTP_PORT) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.threadpool = threadpool
        self.hostname = hostname
        self.route_for = route_for
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.attempt_lifetime = attempt_lifetime
        self.tls_options = tls_options
        self.is_me = is_me or make_is_me()
        self.mx_port = mx_port
        self._refit = defer.DeferredSemaphore(REFIT_AT_ONCE)
        self._long_lines: dict[tuple, bool] = {}

    def _defer(self, f, *args):
        return deferToThreadPool(self.reactor, self.threadpool, f, *args)

    @defer.inlineCallbacks
    def deliver(self, env: Envelope, indices: list[int], messages: IMessageSource):
        """-> Deferred[list[Result]] aligned with `indices` (all at one domain); the message
        is read from `messages`."""
        rcpts = [env.recipients[i].address for i in indices]
        domain = rcpts[0].rpartition("@")[2].lower().rstrip(".")
        targets = yield self._targets(domain)
        if isinstance(targets, Result):
            return [targets] * len(rcpts)
        held = False
        preloaded, fitted = None, False
        try:
            if env.size <= PRELOAD_MAX:
                preloaded, fitted = yield self._defer(read_fitted, messages, env)
            elif (yield self._has_long_line(messages, env)):
                # Re-encoded, a large message is held whole: REFIT_AT_ONCE at a time (a wait
                # bounded by the ATTEMPT_LIFETIME of those ahead; it does not count in ours).
                yield self._refit.acquire()
                held = True
                preloaded, fitted = yield self._defer(read_fitted, messages, env)
        except Exception as e:  # noqa: BLE001
            if held:
                self._refit.release()
            return [deferral(f"Unable to read the queued message: {e} (#4.3.0)")] * len(rcpts)
        size = env.size
        if fitted:
            size = max(size, len(preloaded))
            self.log.info("remote: msg {qid}: lines over {n} octets re-encoded for sending, "
                          "{old} -> {new} bytes", qid=env.qid, n=MAX_LINE, old=env.size,
                          new=len(preloaded))
        ends = self.reactor.seconds() + self.attempt_lifetime
        try:
            results = yield self._try_targets(env, rcpts, targets, messages, preloaded, size,
                                              ends)
        finally:
            if held:
                self._refit.release()
        return results

    def _has_long_line(self, messages: IMessageSource, env: Envelope) -> defer.Deferred:
        """Deferred[bool]: does the stored message have a line over MAX_LINE (read once per
        message, LONG_LINE_MEMORY)?"""
        key = (env.qid, env.token)
        known = self._long_lines.get(key)
        if known is not None:
            return defer.succeed(known)
        d = self._defer(has_long_line_streamed, messages, env)
        if not env.token:
            return d        # a queue file older than tokens: its id alone may be reused

        def remember(found: bool) -> bool:
            if len(self._long_lines) >= LONG_LINE_MEMORY:
                del self._long_lines[next(iter(self._long_lines))]      # the oldest
            self._long_lines[key] = found
            return found
        return d.addCallback(remember)

    @defer.inlineCallbacks
    def _try_targets(self, env: Envelope, rcpts: list[str], targets: list, messages,
                     preloaded: bytes | None, size: int, ends: float):
        last: list[Result] | None = None
        unreachable: list[str] = []          # "ip:port: why" of each address not reached
        for ip, port, name in targets[:MAX_ADDRESSES]:
            left = ends - self.reactor.seconds()
            if left <= 0:
                self.log.info("remote: attempt over its {s} s: {ip}:{port} and the rest not "
                              "tried", s=self.attempt_lifetime, ip=ip, port=port)
                unreachable.append(f"{ip}:{port}: not tried, the attempt took over "
                                   f"{self.attempt_lifetime:g} s")
                break
            timeout = min(self.connect_timeout, left)
            core = ClientCore(helo=self.hostname, sender=env.sender, recipients=rcpts,
                              size=size, host=ip,
                              tls_available=self.tls_options is not None)
            try:
                core = yield self._attempt(ip, port, core, env, messages, preloaded, name,
                                           ends, timeout)
            except Exception as e:  # noqa: BLE001 - connection refused, timeout, unreachable
                self.log.info("remote: cannot connect to {ip}:{port}: {why}", ip=ip,
                              port=port, why=_why(e))
                unreachable.append(f"{ip}:{port}: {connect_error_text(e, timeout)}")
                continue
            results = [r or deferral(T_NO_CONNECTION) for r in core.results]
            if not core.try_next_host:
                return results
            last = results
        if last is None:
            # qmail's text, then which hosts were tried and what each connect said, so the
            # log and `queue list` show why without a second grep.
            text = T_NO_CONNECTION
            if unreachable:
                text += "\n" + "; ".join(unreachable)[:UNREACHABLE_TEXT_MAX]
            return [deferral(text, unreachable=True)] * len(rcpts)
        return last

    def _attempt(self, ip: str, port: int, core: ClientCore, env: Envelope,
                 messages: IMessageSource, preloaded: bytes | None,
                 name: str | None = None, ends: float | None = None,
                 connect_timeout: float | None = None) -> defer.Deferred:
        proto = _SMTPClientProtocol(self, core, env, messages, preloaded, name, ends)
        self.reactor.connectTCP(ip, port, _Factory(proto),
                                timeout=connect_timeout or self.connect_timeout)
        return proto.finished

    @defer.inlineCallbacks
    def _targets(self, domain: str):
        """-> list of (ip, port, host name or None) to try in order, or a Result for every
        recipient. The name is what the server's certificate should carry."""
        from mailappliance.dns import DNSPermanentError, DNSTemporaryError
        route = self.route_for(domain)
        if route is not None:
            host = route.host.strip("[]")
            if _is_ip(host):
                return [(host, route.port, None)]
            try:
                ips = yield self.resolver.addresses(host)
            except DNSPermanentError:
                return failure(T_NO_HOST.format(domain=host))
            except DNSTemporaryError as e:
                return deferral(T_DNS_TEMP.format(why=e), unreachable=True)
            if not ips:
                return failure(T_NO_HOST.format(domain=host))
            return [(ip, route.port, host) for ip in ips]
        if _is_ip(domain):
            return failure(T_NO_HOST.format(domain=domain))   # never relay to literals
        try:
            mxs = yield self.resolver.mx_hosts(domain)
        except DNSPermanentError:
            return failure(T_NO_HOST.format(domain=domain))
        except DNSTemporaryError as e:
            return deferral(T_DNS_TEMP.format(why=e), unreachable=True)
        lookups = [self._addresses(host) for _pref, host in mxs]
        answers = yield defer.gatherResults(lookups)
        temp = False
        entries = []
        for (pref, host), (ips, was_temp) in zip(mxs, answers):
            temp = temp or was_temp
            entries.append((pref, host, ips))
        mine = [pref for pref, _h, ips in entries if any(self.is_me(ip) for ip in ips)]
        prefme = min(mine) if mine else None
        out = [(ip, self.mx_port, h) for pref, h, ips in entries
               if prefme is None or pref < prefme for ip in ips]
        if not out:
            if prefme is not None:
                return failure(T_LOOP)
            if temp:
                return deferral(T_DNS_TEMP.format(why=f"no address for the MX hosts of {domain}"),
                                unreachable=True)
            return failure(T_NO_HOST.format(domain=domain))
        return out

    @defer.inlineCallbacks
    def _addresses(self, host: str):
        from mailappliance.dns import DNSError, DNSTemporaryError
        try:
            ips = yield self.resolver.addresses(host)
        except DNSTemporaryError:
            return [], True
        except DNSError:
            return [], False
        return list(ips), False


def read_fitted(messages: IMessageSource, env: Envelope) -> tuple[bytes, bool]:
    """(the whole message with lines over RFC 5321's limit re-encoded, whether any was)
    (pool thread)."""
    data = messages.read_message(env)
    fitted = fit_lines(data)
    return fitted, fitted is not data


def has_long_line_streamed(messages: IMessageSource, env: Envelope) -> bool:
    """Does the stored message have a line over MAX_LINE? Read in chunks (pool thread)."""
    reader = messages.open_message(env)
    try:
        scanner = LongLineScanner()
        while True:
            chunk = reader.read()
            if not chunk:
                return False
            if scanner.feed(chunk):
                return True
    finally:
        reader.close()


def connect_error_text(e: BaseException, timeout: float) -> str:
    """A failed connect in an operator's words: ``Connection refused (errno 111)``,
    ``no answer within 60 s``."""
    if isinstance(e, error.TimeoutError):
        return f"no answer within {timeout:g} s"
    number = getattr(e, "osError", None)
    if isinstance(number, int):
        try:
            return f"{os.strerror(number)} (errno {number})"
        except ValueError:
            pass
    return _why(e)


def _why(e: BaseException) -> str:
    if isinstance(e, error.ConnectError) or hasattr(e, "value"):
        return str(getattr(e, "value", e))
    return str(e) or type(e).__name__


@implementer(IOpenSSLClientConnectionCreator)
class OpportunisticTLS:
    """The client side of one STARTTLS (an IOpenSSLClientConnectionCreator): encrypt always,
    check the certificate, never refuse over it; `report()` says what was checked."""

    def __init__(self, context, server_name: str) -> None:
        self.context = context
        self.server_name = server_name.strip("[]").rstrip(".")
        self.connection = None
        self.chain_error: str | None = None

    def clientConnectionForTLS(self, tls_protocol):
        from OpenSSL import SSL
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tls_protocol)
        conn.set_verify(SSL.VERIFY_PEER, self._verify)
        if not _is_ip(self.server_name):
            try:
                conn.set_tlsext_host_name(self.server_name.encode("idna"))     # SNI
            except UnicodeError:
                pass
        conn.set_connect_state()
        self.connection = conn
        return conn

    def _verify(self, conn, cert, errnum: int, depth: int, ok: int) -> bool:
        if not ok and self.chain_error is None:
            self.chain_error = _verify_error_text(errnum)
        return True                      # opportunistic: an unverified peer is still used

    def report(self) -> tuple[str, str, str]:
        """(TLS version, cipher, "verified" or "not verified: <why>") after the handshake."""
        from service_identity import VerificationError
        from service_identity.pyopenssl import verify_hostname, verify_ip_address
        conn = self.connection
        version = conn.get_protocol_version_name()
        cipher = conn.get_cipher_name() or "unknown"
        if conn.get_peer_certificate() is None:
            return version, cipher, "not verified: no certificate"
        if self.chain_error is not None:
            return version, cipher, f"not verified: {self.chain_error}"
        try:
            if _is_ip(self.server_name):
                verify_ip_address(conn, self.server_name)
            else:
                verify_hostname(conn, self.server_name)
        except VerificationError:
            return version, cipher, f"not verified: it does not name {self.server_name}"
        except Exception as e:  # noqa: BLE001 - a certificate service-identity cannot read
            return version, cipher, f"not verified: {type(e).__name__}"
        return version, cipher, "verified"


def _verify_error_text(errnum: int) -> str:
    try:
        from OpenSSL._util import ffi, lib      # pyOpenSSL has no public name for this
        return ffi.string(lib.X509_verify_cert_error_string(errnum)).decode("ascii", "replace")
    except Exception:  # noqa: BLE001
        return f"X509 verify error {errnum}"


def client_tls_options():
    """Opportunistic STARTTLS (Postfix's smtp_tls_security_level = may): encrypt, check the
    certificate and log the result, don't insist. -> make(server_name) -> connection creator,
    None without pyOpenSSL. One SSL context (CA store loaded once) serves every connection."""
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        return None
    context = None

    def make(server_name: str) -> OpportunisticTLS:
        nonlocal context
        if context is None:
            ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
            ctx.set_min_proto_version(SSL.TLS1_2_VERSION)   # RFC 8996; as the server side
            ctx.set_options(SSL.OP_NO_COMPRESSION)
            ctx.set_default_verify_paths()                  # system CAs, SSL_CERT_FILE/DIR
            context = ctx
        return OpportunisticTLS(context, server_name)
    return make
