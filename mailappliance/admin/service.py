"""The admin endpoints: the line protocol of admin/protocol.py over unix sockets or loopback TCP.

- A unix socket is created with mode ``[admin] socket_mode`` (0600) before it listens, so no
  other user can connect even for an instant; with ``[admin] socket_group`` it is then handed
  to that group (mode 0660 unless socket_mode says otherwise). A stale socket left by a killed
  server is removed at start (Twisted's lockfile=1 protocol), never a socket of a live one.
- A TCP endpoint (config.py accepts it only with interface=127.x or ::1 and a token file)
  serves only loopback peers and only after ``auth`` with the token from
  ``[admin] token_file`` on the following line.
- Commands run one at a time per connection. Blocking work (the user store, bcrypt, the
  queue directory, parsing the configuration) runs in the application's thread pool. While
  a command runs, or while the client does not read its replies, the connection stops
  reading, so a client that never reads costs one reply and a socket buffer, not more.
"""

from __future__ import annotations

import grp
import hmac
import ipaddress
import json
import os
import pwd
import re
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer, endpoints, protocol
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailappliance import stats as stats_mod
from mailappliance.access.relay import normalize_ip
from mailappliance.admin import report
from mailappliance.admin.protocol import (NEED_DATA, AdminConnection, Command, Invalid,
                                          encode_error, encode_reply, help_lines)
from mailappliance.admin.protocol import QUEUE_REMOVE_MAX
from mailappliance.config import ConfigError
from mailappliance.envelope import CorruptEntry
from mailappliance.privileges import data_owner
from mailappliance.queue.naming import parse_message_name
from mailappliance.users.store import StoreError
from zope.interface import implementer

if TYPE_CHECKING:
    from mailappliance.app import App

# At most this many admin connections at once ([admin] max_connections; this is its default):
# the admin socket is for an operator and a few scripts, and each connection may hold a
# thread-pool job (bcrypt) at a time. descriptors.py keeps them out of the network listeners'
# shares, so a flood on SMTP or POP3 never shuts the operator out.
MAX_CONNECTIONS = 10
# Seconds without input (or without the client reading our output) before we hang up; the
# RFC 1939 POP3 minimum, 10 minutes, is plenty for a person at `socat`.
IDLE_TIMEOUT = 600.0
# `queue list` shows this many messages a page unless --limit says otherwise (the reply block
# stays bounded; protocol.QUEUE_PAGE_MAX is the most a page may hold).
QUEUE_LIST_LIMIT = 1000
# The token file holds one line; anything longer than this is not a token file.
MAX_TOKEN_FILE = 4096
# A token shorter than this is refused at start-up (128 bits as hex is 32 characters).
MIN_TOKEN_LENGTH = 16
# Default mode of a group-shared socket when socket_mode was left at its private default.
GROUP_SOCKET_MODE = 0o660
PRIVATE_SOCKET_MODE = 0o600


class CommandRefused(Exception):
    """A command that cannot be done; str() is the text after "error: "."""


# --- endpoints ---------------------------------------------------------------------------------

def _split_unix(description: str) -> tuple[str, list[str]]:
    """unix:PATH[:k=v...] -> (PATH with escapes removed, ["k=v", ...])."""
    body = description.split(":", 1)[1]
    parts = re.split(r"(?<!\\):", body)
    path = parts[0].replace("\\:", ":").replace("\\\\", "\\")
    return path, parts[1:]


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


def socket_permissions(settings) -> tuple[int, int | None]:
    """(mode, gid or None) for the admin unix socket."""
    gid = None
    mode = settings.admin.socket_mode
    if settings.admin.socket_group:
        try:
            gid = grp.getgrnam(settings.admin.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"admin.socket_group: no such group: "
                              f"{settings.admin.socket_group}") from None
        if mode == PRIVATE_SOCKET_MODE:
            mode = GROUP_SOCKET_MODE
    if mode & 0o007:
        raise ConfigError(f"admin.socket_mode: {mode:o} lets every local user in; "
                          "use 600 or 660 with admin.socket_group")
    return mode, gid


class _UnixAdminEndpoint:
    """Listens with mode 0600 (set between bind and listen by Twisted), then applies the
    group/owner: the socket only ever widens from private to the configured access."""

    def __init__(self, inner, path: str, mode: int, gid: int | None, owner) -> None:
        self.inner = inner
        self.path = path
        self.mode = mode
        self.gid = gid
        self.owner = owner

    def listen(self, factory):
        d = self.inner.listen(factory)
        d.addCallback(self._permissions)
        return d

    def _permissions(self, port):
        uid = -1
        gid = -1 if self.gid is None else self.gid
        if self.owner is not None:
            uid = self.owner[0]
            if self.gid is None:
                gid = self.owner[1]
        # The socket is 0600 root:root here. Group first (the mode still keeps everyone but
        # root out), then the mode while root still owns it (afterwards root would need
        # CAP_FOWNER, which the systemd unit's bounding set does not grant), then the owner.
        if gid != -1:
            os.chown(self.path, -1, gid)
        os.chmod(self.path, self.mode)
        if uid != -1:
            os.chown(self.path, uid, -1)
            # Twisted's lock for the socket (a symlink naming our pid): the dropped process
            # removes it at stop.
            try:
                os.lchown(self.path + ".lock", uid, -1)
            except FileNotFoundError:
                pass
        return port


def build_endpoint(app: App, kind: str, description: str, reactor):
    """The admin listeners' endpoints (service.LISTENER_KINDS): a unix socket gets its mode,
    group and stale-socket lock; TCP is used as it is."""
    if not description.startswith("unix:"):
        return endpoints.serverFromString(reactor, description)
    path, params = _split_unix(description)
    try:
        mode, gid = socket_permissions(app.settings)
    except ConfigError as e:
        # One clear line and exit 1 from twistd, like a bad configuration file.
        raise SystemExit(f"mailappliance: {e}") from None
    keep = [p for p in params if not p.startswith(("mode=", "lockfile="))]
    text = ":".join([f"unix:{_escape(path)}", *keep, f"mode={PRIVATE_SOCKET_MODE:o}",
                     "lockfile=1"])
    inner = endpoints.serverFromString(reactor, text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _UnixAdminEndpoint(inner, path, mode, gid, data_owner(app.settings.data))


# --- the protocol ------------------------------------------------------------------------------

def unix_peer(transport) -> str:
    """Who is on the other end of a unix socket, for the log: ``unix uid=0(root)``, from the
    kernel's SO_PEERCRED (not something the client says)."""
    try:
        raw = transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
    except (AttributeError, OSError, struct.error):
        return "unix"
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return f"unix uid={uid}({name})"


def _is_loopback(addr) -> bool:
    host = getattr(addr, "host", None)
    if not host:
        return False
    try:
        return ipaddress.ip_address(normalize_ip(host)).is_loopback
    except ValueError:
        return False


@implementer(IHalfCloseableProtocol)
class AdminProtocol(protocol.Protocol):
    """Half-closeable: a client that shuts down its sending side after its commands still
    gets every answer, then the connection closes (`printf 'stat\\n' | socat - UNIX-...`)."""

    log = Logger(namespace="mailappliance.admin.service")

    def __init__(self, factory: "AdminFactory", peer: str, needs_token: bool) -> None:
        self.factory = factory
        self.peer = peer
        self.host = peer.rsplit(":", 1)[0]       # "unix" for the unix socket
        self.core = AdminConnection(needs_token=needs_token)
        self.busy = False
        self.write_paused = False
        self.reading_paused = False
        self.lost = False
        self._in_run = False
        self._timer = None

    # -- connection -------------------------------------------------------------------------
    def connectionMade(self) -> None:
        if self.peer == "unix":
            self.peer = unix_peer(self.transport)
        self.factory.active.add(self)
        stats_mod.connection_opened(self.factory.app.stats, "admin")
        self.transport.registerProducer(self, True)
        self._touch()

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.lost = True
        self.factory.active.discard(self)
        stats_mod.connection_closed(self.factory.app.stats, "admin")
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- IHalfCloseableProtocol ---------------------------------------------------------------
    def readConnectionLost(self) -> None:
        """EOF from the client: answer what was asked, then close (in _loop)."""
        self.core.end_of_input()
        self._run()

    def writeConnectionLost(self) -> None:
        """The client will not read any more: nothing left to answer."""
        self.lost = True
        self.transport.loseConnection()

    def _touch(self) -> None:
        reactor = self.factory.reactor
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.factory.idle_timeout)
        else:
            self._timer = reactor.callLater(self.factory.idle_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.log.info("{peer}: idle for {t:.0f} s, closing", peer=self.peer,
                      t=self.factory.idle_timeout)
        if self.write_paused:
            self.transport.abortConnection()      # the client is not reading at all
        else:
            self.transport.write(encode_error("idle timeout, closing"))
            self.transport.loseConnection()

    # -- IPushProducer: the transport tells us when the client stops reading -----------------
    def pauseProducing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self.write_paused = False
        self._touch()
        self._update_reading()
        self._run()

    def stopProducing(self) -> None:
        self.lost = True

    def _update_reading(self) -> None:
        if self.core.eof:
            return          # nothing more to read; resuming would report the EOF again
        want_pause = self.busy or self.write_paused
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            self.transport.pauseProducing()
        elif not want_pause and self.reading_paused and not self.lost:
            self.reading_paused = False
            self.transport.resumeProducing()

    # -- input ---------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        # No _touch() here: bytes that do not complete a command earn no time (deadline.py);
        # each command does, in _loop.
        self.core.receive_data(data)
        self._run()

    def _run(self) -> None:
        if self._in_run:
            return          # a command finished synchronously inside the loop below
        self._in_run = True
        try:
            self._loop()
        finally:
            self._in_run = False

    def _loop(self) -> None:
        drained = False
        while not (self.busy or self.write_paused or self.lost):
            event = self.core.next_event()
            if event is NEED_DATA:
                drained = True
                break
            self._touch()
            if isinstance(event, Invalid):
                self.log.info("{peer}: refused line: {why}", peer=self.peer, why=event.text)
                self.transport.write(encode_error(event.text))
                if event.fatal:
                    self.transport.loseConnection()
                    return
                continue
            self._execute(event)
        self._update_reading()
        if (self.core.closed or (self.core.eof and drained)) and not self.busy \
                and not self.lost:
            self.transport.loseConnection()

    def _execute(self, cmd: Command) -> None:
        handler = HANDLERS[cmd.name]
        self.busy = True
        d = defer.maybeDeferred(handler, self, cmd)
        d.addCallbacks(self._reply, self._refused, callbackArgs=(cmd,), errbackArgs=(cmd,))
        d.addErrback(self._crashed, cmd)
        d.addBoth(self._done)

    def _reply(self, lines, cmd: Command) -> None:
        # Logged once it is done, with who asked (the socket peer's uid, or the TCP peer),
        # in the same order as a refusal: "<who>: <command>: ok" / ": refused: <why>".
        if cmd.name not in QUIET:
            self.log.info("{peer}: {command}: ok", peer=self.peer, command=cmd.describe())
        if not self.lost:
            self.transport.write(encode_reply(lines))

    def _refused(self, failure, cmd: Command) -> None:
        failure.trap(CommandRefused, StoreError, ConfigError)
        text = str(failure.value)
        self.log.info("{peer}: {command}: refused: {why}", peer=self.peer,
                      command=cmd.describe(), why=text)
        if not self.lost:
            self.transport.write(encode_error(text))

    def _crashed(self, failure, cmd: Command) -> None:
        self.log.failure("{peer}: {command} failed", failure, peer=self.peer,
                         command=cmd.describe())
        if not self.lost:
            self.transport.write(encode_error(
                f"internal error in {cmd.name}: {failure.type.__name__}; see the log"))

    def _done(self, _) -> None:
        self.busy = False
        if not self.lost:
            self._run()


class _Refusal(protocol.Protocol):
    """Over a connection limit: one error reply, then close."""

    def __init__(self, why: str) -> None:
        self.why = why

    def connectionMade(self) -> None:
        self.transport.write(encode_error(self.why))
        self.transport.loseConnection()


class AdminFactory(protocol.ServerFactory):
    log = Logger(namespace="mailappliance.admin.service")
    noisy = False

    def __init__(self, app: App, reactor=None, run_blocking: Callable | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.reactor = reactor or app.reactor
        self.clock = clock
        self.idle_timeout = IDLE_TIMEOUT
        self.active: set[AdminProtocol] = set()
        self.token = read_token(app.settings.admin.token_file)
        if run_blocking is None:
            def run_blocking(f, *a):
                return deferToThreadPool(self.reactor, app.threadpool, f, *a)
        self.run_blocking = run_blocking

    def reload(self, settings) -> None:
        try:
            self.token = read_token(settings.admin.token_file)
        except ConfigError as e:
            self.log.error("keeping the old token: {why}", why=str(e))

    def buildProtocol(self, addr):
        if isinstance(addr, UNIXAddress):
            peer, needs_token = "unix", False
        else:
            if not _is_loopback(addr):
                self.log.warn("refused admin connection from non-loopback {host}",
                              host=getattr(addr, "host", "?"))
                return None
            peer, needs_token = f"{addr.host}:{addr.port}", True
        limits = self.app.settings.admin
        why = None
        if len(self.active) >= limits.max_connections:
            why = "too many admin connections, try again later"
        elif not isinstance(addr, UNIXAddress) and sum(
                1 for p in self.active if p.host == addr.host) >= limits.max_per_ip:
            why = "too many admin connections from your address"
        if why is not None:
            self.log.warn("refused admin connection from {peer}: {why} ({n} open)",
                          peer=peer, why=why, n=len(self.active))
            return _Refusal(why)
        p = AdminProtocol(self, peer, needs_token)
        p.factory = self
        return p


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        raw = path.read_bytes()[:MAX_TOKEN_FILE + 1]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read admin token: {e.strerror or e}") from None
    if len(raw) > MAX_TOKEN_FILE:
        raise ConfigError(f"{path}: admin token file longer than {MAX_TOKEN_FILE} bytes")
    token = raw.decode("utf-8", "replace").strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(f"{path}: admin token must be one word of at least "
                          f"{MIN_TOKEN_LENGTH} characters")
    return token


def build_factory(app: App, kind: str) -> AdminFactory:
    """The factory of the admin endpoints (service.py builds one and shares it among all of
    them: one connection limit, one token), following reloads of the token file."""
    factory = AdminFactory(app)
    app.reload_hooks.append(factory.reload)
    return factory


# --- commands -----------------------------------------------------------------------------------

def _blocking(proto: AdminProtocol, f, *args):
    return proto.factory.run_blocking(f, *args)


def cmd_help(proto, cmd):
    return help_lines()


def cmd_quit(proto, cmd):
    return ["bye"]


def cmd_auth(proto, cmd):
    token = proto.factory.token
    if not proto.core.authenticated:
        if token is None or not hmac.compare_digest(cmd.secret.encode(), token.encode()):
            proto.log.warn("{peer}: admin authentication failed", peer=proto.peer)
            proto.core.closed = True          # one try per connection
            raise CommandRefused("authentication failed")
        proto.core.authenticated = True
        return ["authenticated"]
    return ["authenticated (no token needed here)"]


def _listener_services(app: App) -> tuple[report.ServiceStatus, ...]:
    """One line per listener kind, in the order of app.listeners (service.LISTENER_KINDS)."""
    by_kind: dict[str, list] = {}
    for listener in app.listeners:
        by_kind.setdefault(listener.kind, []).append(listener)
    out = []
    for kind, ls in by_kind.items():
        starts = [l.started_at for l in ls if l.started_at]
        now, total = stats_mod.connections(app.stats, kind)
        out.append(report.ServiceStatus(kind, tuple(l.address_text() for l in ls),
                                        min(starts) if starts else None, now, total))
    return tuple(out)


@dataclass
class QueueFacts:
    status: report.QueueStatus | None
    why: str = ""


def cmd_stat(proto, cmd):
    app = proto.factory.app
    settings = app.settings

    def build(facts: QueueFacts):
        last = app.stats.get("last_errors") or ()
        rules = (f"{settings.rules.count} rules from {settings.rules.source}"
                 if settings.rules is not None else None)
        # The counters the metrics endpoint reads too (metrics.py): both say the same.
        counters = (dict(app.injector.stats), dict(app.queue_manager.stats),
                    dict(app.resolver.stats), stats_mod.failed_logins(app.stats),
                    app.tls.handshakes if app.tls is not None else 0,
                    dict(app.dnsbl.stats))
        snap = report.StatSnapshot(
            hostname=settings.hostname, pid=os.getpid(), started=app.started,
            services=_listener_services(app), queue=facts.status, queue_why=facts.why,
            last_errors=tuple(last), config_path=str(settings.config_path)
            if settings.config_path else None,
            config_loaded=app.stats.get("config_loaded"), rules=rules,
            database=_database_text(app), mailboxes=str(app.store.domains_dir),
            extra=tuple(report.counter_lines(*counters)),
            counters=report.stat_counters(*counters))
        if cmd.options.get("--json"):
            # One value a line (indent), so no reply line comes near MAX_REPLY_LINE.
            return json.dumps(report.stat_json(snap, proto.factory.clock()),
                              indent=1).splitlines()
        return report.format_stat(snap, proto.factory.clock())

    # The directory is counted in the pool; the manager's counters live on the reactor thread.
    d = _blocking(proto, queue_count, app)
    d.addCallback(lambda n: queue_facts(app, n))
    d.addCallback(build)
    return d


def _database_text(app: App) -> str:
    """The directory's database for `stat`: sqlite:FILE or the URI without its password."""
    described = getattr(app.store, "description", None)
    if described:
        return described
    from mailappliance.users.backend import describe_database
    return describe_database(app.settings.users.database, app.settings.data)


def queue_count(app: App) -> int:
    """Blocking: messages in the queue directory (counted, not listed: a queue of a
    million is not a list of a million numbers)."""
    return app.queue_store.count()


def queue_facts(app: App, messages: int) -> QueueFacts:
    """What stat shows about the queue: the count from the directory, the rest from the
    manager's status() (unprocessed = being picked up, local/remote busy and limits)."""
    q = app.settings.queue
    s = app.queue_manager.status()
    oldest = app.queue_manager.oldest_birth()
    return QueueFacts(report.QueueStatus(
        messages, s.get("unprocessed", 0), s.get("local_busy", 0),
        s.get("local_max", q.concurrency_local), s.get("remote_busy", 0),
        s.get("remote_max", q.concurrency_remote),
        None if oldest is None else stats_mod.oldest_age(app.reactor.seconds(), oldest),
        s.get("active"), s.get("active_max"), s.get("backlog"), bool(s.get("loading")),
        tuple(s.get("dead", ()))))


def _delivering(app: App, entries) -> dict:
    """qid -> indices with a delivery in flight (the manager's view, reactor thread)."""
    manager = app.queue_manager
    out = {}
    for e in entries:
        busy = manager.in_delivery(e.qid)
        if busy:
            out[e.qid] = busy
    return out


def cmd_queue_list(proto, cmd):
    app = proto.factory.app
    limit = int(cmd.options.get("--limit", QUEUE_LIST_LIMIT))
    after = cmd.options.get("--after")
    after_qid = parse_message_name(after)[0] if after else None
    d = _blocking(proto, app.queue_store.entries_page, after_qid, limit)

    def show(page):
        entries, total, more = page
        now = proto.factory.clock()
        busy = _delivering(app, entries)
        if cmd.options.get("--json"):
            return report.queue_json_lines(entries, now, total, more, busy)
        return report.format_queue_page(entries, now, total, more, busy)
    d.addCallback(show)
    return d


def _resolve(app: App, text: str):
    """Blocking: the queue entry an id names (N or N.hex), or None when there is none (or
    the number now belongs to another message than N.hex named)."""
    qid, check = parse_message_name(text)
    try:
        entry = app.queue_store.entry(qid)
    except (OSError, CorruptEntry):
        return None
    if check is not None and entry.name != f"{qid}.{check}":
        return None
    return entry


def cmd_queue_show(proto, cmd):
    app = proto.factory.app
    text = cmd.args["ID"]

    def work():
        entry = _resolve(app, text)
        if entry is None:
            return None, b""
        try:
            env = app.queue_store.read_envelope(entry.qid)
            return entry, app.queue_store.header(env)
        except (OSError, CorruptEntry):
            return None, b""

    def show(result):
        entry, header = result
        if entry is None:
            raise CommandRefused(f"message {text}: unknown (not in the queue)")
        return report.format_show(entry, proto.factory.clock(), header,
                                  app.queue_manager.in_delivery(entry.qid))
    return _blocking(proto, work).addCallback(show)


def cmd_queue_flush(proto, cmd):
    app = proto.factory.app
    manager = app.queue_manager
    target = cmd.args.get("TARGET")
    if target is None:
        d = defer.maybeDeferred(manager.flush)
        d.addCallback(lambda n: [f"{n} deferred messages scheduled for delivery now"])
        return d
    if target.startswith("@"):
        domain = target[1:].lower()
        d = defer.maybeDeferred(manager.flush, None, domain)
        d.addCallback(lambda n: [f"{n} deferred messages with recipients at {domain} "
                                 "scheduled for delivery now"])
        return d

    def flush_one(entry):
        if entry is None:
            raise CommandRefused(f"message {target}: unknown (not in the queue)")
        n = manager.flush(entry.qid)
        if not n:
            return [f"message {entry.name}: nothing deferred to retry"]
        return [f"message {entry.name} scheduled for delivery now"]
    return _blocking(proto, _resolve, app, target).addCallback(flush_one)


@defer.inlineCallbacks
def cmd_queue_remove(proto, cmd):
    app = proto.factory.app
    manager = app.queue_manager
    ids = list(cmd.args["ID"])
    bounce = bool(cmd.options.get("--bounce"))
    if len(ids) > QUEUE_REMOVE_MAX:
        raise CommandRefused(f"queue remove: at most {QUEUE_REMOVE_MAX} ids at a time")
    for text in ids:
        try:
            parse_message_name(text)
        except ValueError as e:
            raise CommandRefused(f"queue remove: {text}: {e}") from None
    lines, refused = [], []
    for text in ids:
        entry = yield _blocking(proto, _resolve, app, text)
        if entry is None:
            refused.append(f"message {text}: unknown (not in the queue)")
            continue
        if manager.in_delivery(entry.qid):
            refused.append(f"message {entry.name}: a delivery of it is in progress; "
                           "try again when it ends")
            continue
        ok = yield manager.remove(entry.qid, bounce)
        if not ok:
            if manager.in_delivery(entry.qid):
                refused.append(f"message {entry.name}: a delivery of it is in progress; "
                               "try again when it ends")
            else:
                refused.append(f"message {text}: unknown (not in the queue)")
            continue
        lines.append(f"message {entry.name} {'bounced to its sender and ' if bounce else ''}"
                     "removed")
    if refused:
        # Refused as a whole reply (exit 1), saying what was done before.
        raise CommandRefused("; ".join(refused + lines))
    return lines


def cmd_reload(proto, cmd):
    from mailappliance.reload import ReloadRefused
    d = proto.factory.app.reloader.reload(f"admin {proto.peer}")

    def refused(f):
        f.trap(ReloadRefused)
        raise CommandRefused(str(f.value))
    d.addErrback(refused)
    return d


def _store_call(proto, f: Callable[[Any], list[str]]):
    store = proto.factory.app.store
    return _blocking(proto, f, store)


def cmd_domain_add(proto, cmd):
    return _store_call(proto, lambda s: [f"domain {s.add_domain(cmd.args['NAME'], cmd.options.get('--postmaster'))} added"])


def cmd_domain_del(proto, cmd):
    def f(s):
        removed = s.del_domain(cmd.args["NAME"], force=bool(cmd.options.get("--force")))
        gone = f" with {removed} message{'s' * (removed != 1)}" if removed else ""
        return [f"domain {cmd.args['NAME'].lower()} deleted{gone}"]
    return _store_call(proto, f)


def cmd_domain_list(proto, cmd):
    return _store_call(proto, lambda s: s.list_domains())


def cmd_user_add(proto, cmd):
    def f(s):
        user = s.add_user(cmd.args["ADDR"], cmd.secret, int(cmd.options.get("--quota", 0)))
        return [f"user {user.address} added"]
    return _store_call(proto, f)


def cmd_user_del(proto, cmd):
    def f(s):
        s.del_user(cmd.args["ADDR"])
        return [f"user {cmd.args['ADDR'].lower()} deleted"]
    return _store_call(proto, f)


def cmd_user_passwd(proto, cmd):
    def f(s):
        s.set_password(cmd.args["ADDR"], cmd.secret)
        return [f"password of {cmd.args['ADDR'].lower()} changed"]
    return _store_call(proto, f)


def cmd_user_list(proto, cmd):
    def f(s):
        return [u.address + (f" quota={u.quota}" if u.quota else "")
                for u in s.list_users(cmd.args.get("DOMAIN"))]
    return _store_call(proto, f)


def cmd_alias_add(proto, cmd):
    def f(s):
        s.add_alias(cmd.args["ADDR"], list(cmd.args["TARGET"]))
        return [f"alias {cmd.args['ADDR'].lower()} added"]
    return _store_call(proto, f)


def cmd_alias_del(proto, cmd):
    def f(s):
        s.del_alias(cmd.args["ADDR"])
        return [f"alias {cmd.args['ADDR'].lower()} deleted"]
    return _store_call(proto, f)


def cmd_alias_list(proto, cmd):
    from mailappliance.users.store import alias_line

    def f(s):
        shadowed = s.shadowed_aliases()
        return [alias_line(a, t, shadowed) for a, t in s.list_aliases()]
    return _store_call(proto, f)


def cmd_relay_list(proto, cmd):
    grants = proto.factory.app.grants
    if proto.factory.app.lookups.remote_grants:       # PostgreSQL: a query, in a thread
        d = _blocking(proto, grants.entries)
        d.addCallback(lambda entries: report.format_grants(list(entries)))
        return d
    return report.format_grants(list(grants.entries()))


# Command name (protocol.COMMANDS) -> handler(protocol, command) -> lines | Deferred[lines].
HANDLERS: dict[str, Callable[[AdminProtocol, Command], Any]] = {
    "help": cmd_help,
    "stat": cmd_stat,
    "queue list": cmd_queue_list,
    "queue show": cmd_queue_show,
    "queue flush": cmd_queue_flush,
    "queue remove": cmd_queue_remove,
    "reload": cmd_reload,
    "domain add": cmd_domain_add,
    "domain del": cmd_domain_del,
    "domain list": cmd_domain_list,
    "user add": cmd_user_add,
    "user del": cmd_user_del,
    "user passwd": cmd_user_passwd,
    "user list": cmd_user_list,
    "alias add": cmd_alias_add,
    "alias del": cmd_alias_del,
    "alias list": cmd_alias_list,
    "relay list": cmd_relay_list,
    "auth": cmd_auth,
    "quit": cmd_quit,
}
# Not written to the log on every call (read-only and frequent).
QUIET = frozenset({"help", "quit"})
