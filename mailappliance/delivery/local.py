"""Local delivery (qmail-local + vdelivermail): one recipient of a virtual domain.

For a recipient address:

* a user of the store: Maildir delivery (delivery/maildir.py) with ``Return-Path`` and
  ``Delivered-To``; success report ``did 1+0+0/`` (qmail-local's);
* an alias (including the per-domain postmaster/abuse/mailer-daemon aliases the user store
  keeps): the message is forwarded -- re-injected through the injector passed in (the one
  door; this module never imports the queue), with ``Delivered-To: <alias>`` added
  on top and the original envelope sender, to all the alias's targets at once.  qmail-local's
  report: ``did 0+0+N/qp Q/``.  Targets may be local or remote, or aliases again: each hop is
  one more injection with one more Delivered-To line;
* anything else in our domains: permanent failure ``Sorry, no mailbox here by that name.
  (#5.1.1)``.

Loops (qmail-local): a message that already carries our ``Delivered-To: <recipient>`` line is a
permanent failure "This message is looping: it already has my Delivered-To line. (#5.4.6)".
Depth: a message with `MAX_DELIVERED_TO` or more Delivered-To lines is not forwarded again
(alias chains longer than that are a mistake or a loop through other hosts).

The host name itself (``postmaster@<hostname>``, qmail's `me` in control/locals) is local
too: its role names go to the default domain's aliases.

Blocking work (SQLite lookups, header scan, Maildir write) runs in a thread pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from zope.interface import implementer

from mailappliance.batching import Batcher
from mailappliance.delivery import maildir as maildir_mod
from mailappliance.delivery.interfaces import ILocalDeliverer, IMessageSource
from mailappliance.envelope import Envelope, Result, deferral, failure, success
from mailappliance.fileops import FileOps
from mailappliance.users.store import User

# Delivered-To lines a message may carry before we stop forwarding it.  qmail counts
# Received + Delivered-To against MAXHOPS = 100 in qmail-smtpd; alias chains need far fewer.
MAX_DELIVERED_TO = 20
# Header bytes scanned for Delivered-To lines (qmail-local reads the whole header; we stop
# at this bound so a hostile endless header costs bounded work).
MAX_HEADER_SCAN = 1024 * 1024
# Messages up to this size are read into memory once per delivery (header scan and Maildir
# write); larger ones are streamed in the message source's chunks.
READ_WHOLE_MAX = 256 * 1024
# Small-message deliveries handed to a pool thread in one trip (see LocalDeliverer._batched).
MAX_BATCH = 64
# How long a delivery that finds the batcher idle waits for others to share its pool trip and
# its fsync of new/ (the Batcher's gathering window), in seconds.  At one SMTP session each
# message arrives alone, a few ms after the previous one's 250 (2-4 ms at 250-500 msg/s), so
# without a window every message costs its own trip and directory fsync.  The delivery is not
# on the client's critical path (the 250 waited only for the queue file); this bounds the wait.
# The queue's service (queue/service.py) passes it; the class's default is no window.
GATHER_WINDOW = 0.010
# The RFC 2142 role names that exist for the host name itself.
ROLE_NAMES = ("postmaster", "abuse", "mailer-daemon")

TEXT_NO_MAILBOX = "Sorry, no mailbox here by that name. (#5.1.1)"
TEXT_LOOP = "This message is looping: it already has my Delivered-To line. (#5.4.6)"
TEXT_TOO_MANY_HOPS = "This message is looping: too many Delivered-To lines. (#5.4.6)"
TEXT_FORWARD_FAILED = "Unable to forward message: {why} (#4.3.0)"
TEXT_STORE_FAILED = "Unable to look up the recipient: {why} (#4.3.0)"


def header_delivered_to(chunks) -> list[str]:
    """Delivered-To values (lower-case, stripped) in the header section of a message."""
    found: list[str] = []
    buf = b""
    scanned = 0
    for chunk in chunks:
        buf += chunk
        scanned += len(chunk)
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1:]
            if line in (b"", b"\r"):
                return found
            if line[:13].lower() == b"delivered-to:":
                found.append(line[13:].strip().decode("utf-8", "replace").lower())
        if scanned >= MAX_HEADER_SCAN:
            break
    return found


@dataclass
class _Forward:
    alias: str
    targets: list[str]


@implementer(ILocalDeliverer)
class LocalDeliverer:
    """`injector` is the queue's one door (queue/inject.py Injector, passed in by the queue's
    service): `begin()` -> a writer with write(bytes), abort() and commit(sender, recipients,
    received_from) -> Deferred[qid]. Forwards go through it; nothing here imports the queue."""

    log = Logger()

    def __init__(self, users, injector, reactor, threadpool, *,
                 hostname: str, default_domain: str | None = None,
                 clock: Callable[[], float] | None = None, maildir_ops=None,
                 gather_window: float = 0.0) -> None:
        self.users = users
        self.injector = injector
        self.reactor = reactor
        self.threadpool = threadpool
        self.hostname = hostname
        self.default_domain = default_domain
        self.clock = clock or reactor.seconds
        self.maildir_ops = maildir_ops
        self._batcher = Batcher(lambda items: self._defer(self._deliver_many, items),
                                max_batch=MAX_BATCH, window=gather_window, clock=reactor)

    def flush(self) -> None:
        """Start the deliveries waiting in the gathering window now (the queue stops)."""
        self._batcher.flush()

    def _defer(self, f, *args, **kw):
        return deferToThreadPool(self.reactor, self.threadpool, f, *args, **kw)

    def canonical(self, address: str) -> str:
        local, _, domain = address.rpartition("@")
        domain = domain.lower().rstrip(".")
        local = local.lower()
        if (domain == self.hostname.lower().rstrip(".") and local in ROLE_NAMES
                and self.default_domain and not self.users.has_domain(domain)):
            domain = self.default_domain.lower()
        return f"{local}@{domain}"

    @defer.inlineCallbacks
    def deliver(self, env: Envelope, index: int, messages: IMessageSource):
        """-> Deferred[Result] for recipient `index` of the message, read from `messages`."""
        try:
            if env.size <= READ_WHOLE_MAX:
                outcome = yield self._batched(env, index, messages)
            else:
                outcome = yield self._defer(self._deliver_blocking, env, index, messages)
        except Exception as e:  # noqa: BLE001 - any surprise is temporary, never a loss
            self.log.failure("local delivery of msg {qid} failed unexpectedly", qid=env.qid)
            return deferral(TEXT_STORE_FAILED.format(why=str(e) or type(e).__name__))
        if isinstance(outcome, Result):
            return outcome
        result = yield self._forward(env, outcome, messages)
        return result

    # -- small messages: many deliveries per trip to the thread pool ---------------------------
    def _batched(self, env: Envelope, index: int, messages: IMessageSource) -> defer.Deferred:
        """Queue one delivery for the next batch (mailappliance/batching.py): under load each
        trip to a pool thread carries up to MAX_BATCH deliveries, and each Maildir's new/ is
        fsynced once per batch (maildir.finish_many)."""
        return self._batcher.submit((env, index, messages))

    def _deliver_many(self, items: list[tuple[Envelope, int, IMessageSource]]) -> list:
        """In a pool thread: each item's outcome (Result, _Forward or an exception)."""
        outcomes: list = [None] * len(items)
        pending: list[tuple[int, maildir_mod.Pending]] = []
        bytes_for: dict[str, int] = {}
        for k, (env, index, messages) in enumerate(items):
            try:
                prep = self._prepare(env, index, messages)
                if not isinstance(prep, tuple):
                    outcomes[k] = prep
                    continue
                user, address, data = prep
                maildir = str(user.maildir)
                p = maildir_mod.prepare(maildir, return_path=env.sender,
                                        delivered_to=address, hostname=self.hostname,
                                        now=self.clock(), quota=user.quota,
                                        size_hint=env.size, data=data,
                                        pending_bytes=bytes_for.get(maildir, 0))
                bytes_for[maildir] = bytes_for.get(maildir, 0) + p.size
                pending.append((k, p))
            except maildir_mod.MaildirError as e:
                outcomes[k] = deferral(e.text) if e.temporary else failure(e.text)
            except Exception as e:  # noqa: BLE001 - reported for this delivery only
                outcomes[k] = e
        if pending:
            try:
                # one call creates every tmp/ file, one writes, fsyncs and renames them all
                maildir_mod.create_many([p for _, p in pending], self.maildir_ops)
                maildir_mod.finish_many([p for _, p in pending], self.maildir_ops)
            except Exception as e:  # noqa: BLE001 - not known delivered: all temporary
                for k, p in pending:
                    if p.final is None:
                        outcomes[k] = e
                        maildir_mod.discard(p, self.maildir_ops or FileOps())
            for k, p in pending:
                if outcomes[k] is not None:
                    continue
                if p.final is not None:
                    outcomes[k] = success(maildir_mod.TEXT_SUCCESS)
                else:
                    e = p.error
                    outcomes[k] = deferral(e.text) if e.temporary else failure(e.text)
        return outcomes

    def _prepare(self, env: Envelope, index: int, messages: IMessageSource):
        """A small message's checks: a final Result, a _Forward, or (user, address, data)."""
        address = self.canonical(env.recipients[index].address)
        data = messages.read_message(env)
        route = self._route(address, header_delivered_to([data]))
        return (route, address, data) if isinstance(route, User) else route

    def _route(self, address: str, seen: list[str]):
        """qmail-local's decision: loop, the user's Maildir, an alias's forward, or nobody.
        -> a final Result, a _Forward, or the User to deliver to."""
        if address in seen:
            return failure(TEXT_LOOP)
        user = self.users.get_user(address)
        if user is not None:
            return user
        targets = self.users.get_alias(address)
        if targets:
            if len(seen) >= MAX_DELIVERED_TO:
                return failure(TEXT_TOO_MANY_HOPS)
            return _Forward(address, list(dict.fromkeys(targets)))
        return failure(TEXT_NO_MAILBOX)

    # -- one delivery per pool trip (large messages, streamed) ---------------------------------
    def _deliver_blocking(self, env: Envelope, index: int, messages: IMessageSource):
        """A message too large to read at once: its header is scanned, then it is streamed."""
        address = self.canonical(env.recipients[index].address)
        with messages.open_message(env) as reader:
            route = self._route(address, header_delivered_to(reader))
        if not isinstance(route, User):
            return route
        try:
            with messages.open_message(env) as reader:
                maildir_mod.deliver(route.maildir, reader, return_path=env.sender,
                                    delivered_to=address, hostname=self.hostname,
                                    now=self.clock(), quota=route.quota, size_hint=env.size,
                                    ops=self.maildir_ops)
        except maildir_mod.MaildirError as e:
            return deferral(e.text) if e.temporary else failure(e.text)
        return success(maildir_mod.TEXT_SUCCESS)

    @defer.inlineCallbacks
    def _forward(self, env: Envelope, fwd: _Forward, messages: IMessageSource):
        writer = self.injector.begin()
        writer.write(b"Delivered-To: " + fwd.alias.encode("utf-8", "surrogateescape") + b"\n")
        reader = yield self._defer(messages.open_message, env)
        try:
            while True:
                chunk = yield self._defer(reader.read)
                if not chunk:
                    break
                writer.write(chunk)
        except Exception as e:  # noqa: BLE001
            writer.abort()
            return deferral(TEXT_FORWARD_FAILED.format(why=str(e)))
        finally:
            yield self._defer(reader.close)
        try:
            qid = yield writer.commit(env.sender, fwd.targets, None)
        except Exception as e:  # noqa: BLE001 - QueueWriteError or a refused address
            return deferral(TEXT_FORWARD_FAILED.format(why=str(e)))
        return success("did 0+0+%d/qp %d/" % (len(fwd.targets), qid))
