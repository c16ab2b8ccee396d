"""The POP3 adapter with Twisted doubles: StringTransport, a Clock reactor, a thread pool that
runs inline (or on demand), and the real pieces behind them: build_factory, the UserStore with
bcrypt, Authenticator, RelayGrants, Maildirs on disk."""

from __future__ import annotations

import os
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailappliance.access.relay import RelayGrants
from mailappliance.config import ConfigError, POP3Settings, TLSSettings
from mailappliance.pop3 import core
from mailappliance.pop3.mailbox import READ_CHUNK
from mailappliance.pop3.protocol import POP3ServerProtocol
from mailappliance.pop3.service import build_factory
from mailappliance.testing.app import build_test_app
from mailappliance.testing.threads import DeferredThreadPool, ThreadlessReactor
from mailappliance.testing.transport import BufferedStringTransport
from tests.pop3_support import deliver, make_cert, message

PASSWORD = "Passw0rd!"


def make_app(tmp_path, *, pool=None, minutes=30, require_tls=False, tls=False, timeout=600):
    reactor = ThreadlessReactor()
    reactor.advance(1_000_000)
    tls_settings = TLSSettings()
    if tls:
        tls_settings = TLSSettings(*make_cert(tmp_path / "tls"))
    app = build_test_app(tmp_path / "data", reactor=reactor, threadpool=pool,
                         hostname="mx.test.example", default_domain="test.com",
                         tls=tls_settings,
                         pop3=POP3Settings(roaming_relay_minutes=minutes, timeout=timeout,
                                           require_tls=require_tls))
    app.store.add_domain("test.com")
    app.store.add_user("test@test.com", PASSWORD)
    app.store.add_user("other@test.com", PASSWORD)
    return app


def maildir(app):
    """test@test.com's Maildir."""
    return app.store.maildir_for("test", "test.com")


class TLSCapableTransport(StringTransport):
    """StringTransport that records startTLS (the real handshake is in the integration tests)."""

    tls_options = None
    before_tls = b""

    def startTLS(self, options):
        self.tls_options = options
        self.before_tls = self.value()


def connect(factory, ip="127.0.0.5", transport_class=StringTransport):
    proto = factory.buildProtocol(IPv4Address("TCP", ip, 40000))
    t = transport_class(peerAddress=IPv4Address("TCP", ip, 40000))
    proto.makeConnection(t)
    return proto, t


def take(t) -> bytes:
    v = t.value()
    t.clear()
    return v


def say(proto, t, data: bytes) -> bytes:
    proto.dataReceived(data)
    return take(t)


def login(proto, t, user=b"test", password=PASSWORD.encode()) -> bytes:
    return say(proto, t, b"USER " + user + b"\r\nPASS " + password + b"\r\n")


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


@pytest.fixture
def factory(app):
    f = build_factory(app, "pop3")
    f.doStart()
    yield f
    f.doStop()


def test_full_session_retr_dele_quit(app, factory):
    names = [deliver(maildir(app), message(i), mtime=1_700_000_000 + i) for i in range(3)]
    proto, t = connect(factory)
    greeting = take(t)
    assert greeting == b"+OK mx.test.example POP3 server ready\r\n"
    assert login(proto, t) == b"+OK\r\n+OK maildrop has 3 messages (%d octets)\r\n" % sum(
        len(message(i)) for i in range(3))
    out = say(proto, t, b"RETR 2\r\n")
    body = message(1).replace(b"\n", b"\r\n")
    assert out == b"+OK %d octets\r\n" % len(message(1)) + body + b".\r\n"
    assert say(proto, t, b"DELE 1\r\nDELE 3\r\n") == (b"+OK message 1 deleted\r\n"
                                                      b"+OK message 3 deleted\r\n")
    # Nothing changes on disk before QUIT.
    assert sorted(os.listdir(maildir(app) / "new")) == sorted(names)
    assert say(proto, t, b"QUIT\r\n") == b"+OK signing off\r\n"
    assert t.disconnecting
    assert os.listdir(maildir(app) / "new") == []
    assert os.listdir(maildir(app) / "cur") == [names[1] + ":2,"]
    proto.connectionLost(None)


def test_connections_are_counted_for_stat(app, factory):
    from mailappliance import stats
    a, _ = connect(factory)
    b, _ = connect(factory)
    assert stats.connections(app.stats, "pop3") == (2, 2)
    a.connectionLost(None)
    assert stats.connections(app.stats, "pop3") == (1, 2)


def test_dropped_connection_deletes_nothing_and_frees_the_lock(app, factory):
    names = [deliver(maildir(app), message(i), mtime=1_700_000_000 + i) for i in range(2)]
    proto, t = connect(factory)
    login(proto, t)
    say(proto, t, b"DELE 1\r\nDELE 2\r\n")
    proto.connectionLost(None)
    assert sorted(os.listdir(maildir(app) / "new")) == sorted(names)
    proto2, t2 = connect(factory)
    take(t2)
    assert login(proto2, t2).endswith(b"+OK maildrop has 2 messages (%d octets)\r\n"
                                      % sum(len(message(i)) for i in range(2)))


def test_pipelined_session_answers_in_order(app, factory):
    deliver(maildir(app), b"Subject: a\n\n.dot line\n", mtime=1_700_000_000)
    deliver(maildir(app), b"Subject: b\n\nb1\nb2\n", mtime=1_700_000_001)
    proto, t = connect(factory)
    take(t)
    out = say(proto, t, b"USER test\r\nPASS " + PASSWORD.encode() +
              b"\r\nSTAT\r\nRETR 1\r\nTOP 2 1\r\nDELE 1\r\nQUIT\r\n")
    assert out == (b"+OK\r\n+OK maildrop has 2 messages (40 octets)\r\n+OK 2 40\r\n"
                   b"+OK 22 octets\r\nSubject: a\r\n\r\n..dot line\r\n.\r\n"
                   b"+OK top of message follows\r\nSubject: b\r\n\r\nb1\r\n.\r\n"
                   b"+OK message 1 deleted\r\n+OK signing off\r\n")
    assert len(os.listdir(maildir(app) / "cur")) == 1


def test_big_retr_streams_in_bounded_chunks(app, factory):
    size = 3 * 1024 * 1024 + 17
    deliver(maildir(app), message(1, size), mtime=1_700_000_000)
    proto, t = connect(factory)
    take(t)
    login(proto, t)
    take(t)
    proto.dataReceived(b"RETR 1\r\nNOOP\r\n")
    assert t.producer is not None and not t.streaming
    total = [take(t)]
    assert len(total[0]) <= READ_CHUNK * 2 + 100       # the +OK and the first chunk only
    for _ in range(10_000):
        if t.producer is None:
            break
        t.producer.resumeProducing()
        piece = take(t)
        assert len(piece) <= READ_CHUNK * 2 + 10     # LF -> CRLF at most doubles a chunk
        total.append(piece)
    wire = b"".join(total)
    expected = message(1, size).replace(b"\n", b"\r\n")
    assert wire == b"+OK %d octets\r\n" % size + expected + b".\r\n" + b"+OK\r\n"


def test_retr_of_a_file_removed_behind_our_back(app, factory):
    name = deliver(maildir(app), message(1))
    proto, t = connect(factory)
    take(t)
    login(proto, t)
    os.unlink(maildir(app) / "new" / name)
    assert say(proto, t, b"RETR 1\r\n").startswith(b"-ERR [SYS/TEMP] message 1 has vanished")


@pytest.mark.parametrize("login_name", [b"test", b"test@test.com", b"test%test.com",
                                        b"TEST@Test.Com"])
def test_login_forms(app, factory, login_name):
    proto, t = connect(factory)
    take(t)
    assert login(proto, t, user=login_name).endswith(b"+OK maildrop has 0 messages (0 octets)\r\n")


def test_password_check_runs_in_the_thread_pool(tmp_path):
    pool = DeferredThreadPool()
    app = make_app(tmp_path, pool=pool)
    f = build_factory(app, "pop3")
    proto, t = connect(f)
    take(t)
    assert login(proto, t) == b"+OK\r\n"
    assert len(pool.pending) == 1          # bcrypt queued for a pool thread, not run inline
    assert say(proto, t, b"NOOP\r\n") == b""   # pipelined behind PASS: waits
    pool.run_one()                          # the password check
    assert take(t) == b""
    pool.run_one()                          # the mailbox lock + listing
    assert take(t) == b"+OK maildrop has 0 messages (0 octets)\r\n+OK\r\n"


def test_failed_logins_same_reply_same_delay_doubling_per_ip(app, factory):
    reactor = app.reactor
    results = {}
    for ip, user, pw in (("127.0.0.7", b"nosuchuser", b"whatever1!"),
                         ("127.0.0.8", b"test", b"wrong-password1")):
        proto, t = connect(factory, ip)
        take(t)
        assert login(proto, t, user, pw) == b"+OK\r\n"
        results[ip] = (proto, t)
    reactor.advance(1.99)
    assert all(t.value() == b"" for _, t in results.values())
    reactor.advance(0.01)
    assert [t.value() for _, t in results.values()] == [b"-ERR authorization failed\r\n"] * 2
    # The second failure from the same address waits 4 s, the third 8 s (then the connection
    # is closed after MAX_AUTH_FAILURES); a fresh connection from there gets 15 s.
    proto, t = results["127.0.0.8"]
    take(t)
    for expected in (4.0, 8.0):
        login(proto, t, b"test", b"wrong-password1")
        reactor.advance(expected - 0.01)
        assert t.value() == b""
        reactor.advance(0.01)
        assert take(t).startswith(b"-ERR authorization failed")
    assert t.disconnecting
    proto3, t3 = connect(factory, "127.0.0.8")
    take(t3)
    login(proto3, t3, b"test", b"wrong-password1")
    reactor.advance(14.99)
    assert t3.value() == b""
    reactor.advance(0.01)
    assert t3.value() == b"-ERR authorization failed\r\n"


def test_a_penalised_client_does_not_block_others(app, factory):
    bad, tb = connect(factory, "127.0.0.9")
    take(tb)
    login(bad, tb, b"test", b"wrong-password1")
    good, tg = connect(factory, "127.0.0.10")
    take(tg)
    assert login(good, tg).endswith(b"+OK maildrop has 0 messages (0 octets)\r\n")
    assert tb.value() == b""
    app.reactor.advance(2)
    assert tb.value() == b"-ERR authorization failed\r\n"


def test_a_penalised_address_waits_before_its_next_check(app, factory):
    """Parallel connections from one address: the next check starts after the penalty."""
    a, ta = connect(factory, "127.0.0.11")
    take(ta)
    login(a, ta, b"test", b"wrong-password1")      # failure 1: answer due at +2 s
    b, tb = connect(factory, "127.0.0.11")
    take(tb)
    login(b, tb)                                     # the right password, same address
    assert tb.value() == b""
    app.reactor.advance(2)
    assert ta.value() == b"-ERR authorization failed\r\n"
    assert tb.value().endswith(b"+OK maildrop has 0 messages (0 octets)\r\n")


def test_failed_login_logged_once_with_ip_and_escaped_login(app, factory):
    proto, t = connect(factory, "127.0.0.12")
    take(t)
    with capturedLogs() as events:
        login(proto, t, b'evil"\x1b[0m', b"nope-nope-1")
        app.reactor.advance(2)
    lines = [formatEvent(e) for e in events if "login failed" in e.get("log_format", "")]
    assert lines == ['login failed: rip=127.0.0.12 user=<evil\\x22\\x1b[0m> tls=no delay=2s']
    assert not any("nope-nope-1" in formatEvent(e) for e in events)


def test_roaming_relay_granted_on_success_only(app, factory):
    bad, tb = connect(factory, "127.0.0.21")
    take(tb)
    login(bad, tb, b"test", b"wrong-password1")
    app.reactor.advance(2)
    assert not app.grants.is_granted("127.0.0.21")
    with capturedLogs() as events:
        good, tg = connect(factory, "127.0.0.22")
        take(tg)
        login(good, tg)
    assert app.grants.is_granted("127.0.0.22")
    assert not app.grants.is_granted("127.0.0.23")
    assert any(formatEvent(e) == "roaming relay granted: rip=127.0.0.22 user=<test@test.com>"
               " minutes=30" for e in events)
    # Persisted: a restarted server (new RelayGrants on the same file) still knows it.
    again = RelayGrants(app.grants.path, clock=app.reactor.seconds)
    assert again.is_granted("127.0.0.22")
    app.reactor.advance(30 * 60 - 1)
    assert app.grants.is_granted("127.0.0.22")
    app.reactor.advance(2)
    assert not app.grants.is_granted("127.0.0.22")


def test_expired_grants_are_swept_and_logged(app, factory):
    good, tg = connect(factory, "127.0.0.24")
    take(tg)
    login(good, tg)
    with capturedLogs() as events:
        app.reactor.advance(30 * 60 + 61)
    assert "roaming relay expired: rip=127.0.0.24" in [formatEvent(e) for e in events]


def test_roaming_relay_off_with_zero_minutes(tmp_path):
    app = make_app(tmp_path, minutes=0)
    f = build_factory(app, "pop3")
    proto, t = connect(f, "127.0.0.25")
    take(t)
    assert login(proto, t).endswith(b"(0 octets)\r\n")
    assert not app.grants.is_granted("127.0.0.25")


def test_second_session_on_a_mailbox_gets_in_use(app, factory):
    deliver(maildir(app), message(1))
    first, t1 = connect(factory, "127.0.0.31")
    take(t1)
    login(first, t1)
    second, t2 = connect(factory, "127.0.0.32")
    take(t2)
    assert login(second, t2) == b"+OK\r\n-ERR [IN-USE] mailbox in use by another POP3 session\r\n"
    assert app.grants.is_granted("127.0.0.32")      # the password was right
    say(first, t1, b"DELE 1\r\nQUIT\r\n")
    first.connectionLost(None)
    assert login(second, t2).endswith(b"+OK maildrop has 0 messages (0 octets)\r\n")


def test_other_users_mailbox_not_locked(app, factory):
    first, t1 = connect(factory)
    take(t1)
    login(first, t1)
    second, t2 = connect(factory)
    take(t2)
    assert login(second, t2, b"other").endswith(b"(0 octets)\r\n")


def test_idle_timeout(tmp_path):
    app = make_app(tmp_path, timeout=600)
    f = build_factory(app, "pop3")
    proto, t = connect(f)
    take(t)
    app.reactor.advance(599)
    say(proto, t, b"NOOP\r\n")                 # activity pushes the deadline
    app.reactor.advance(599)
    assert not t.disconnecting
    app.reactor.advance(1)
    assert take(t) == b"-ERR autologout: idle for too long\r\n"
    assert t.disconnecting


def test_timeout_mid_login_deletes_nothing_and_unlocks(tmp_path):
    pool = DeferredThreadPool()
    app = make_app(tmp_path, pool=pool)
    deliver(maildir(app), message(1))
    f = build_factory(app, "pop3")
    proto, t = connect(f)
    take(t)
    login(proto, t)
    app.reactor.advance(600)
    assert t.disconnecting
    pool.run_all()                               # the check and the mailbox open finish late
    proto.connectionLost(None)
    from mailappliance.pop3.mailbox import open_session
    box, msgs = open_session(maildir(app))        # not left locked
    assert len(msgs) == 1
    box.unlock()


def test_pipelined_flood_pauses_reading_until_handled(tmp_path):
    pool = DeferredThreadPool()
    app = make_app(tmp_path, pool=pool)
    f = build_factory(app, "pop3")
    proto, t = connect(f)
    take(t)
    login(proto, t)
    flood = b"NOOP\r\n" * (core.MAX_PENDING_INPUT // 6 + 10)
    proto.dataReceived(flood)
    assert t.producerState == "paused"
    pool.run_all()
    assert t.producerState == "producing"
    assert take(t).count(b"+OK\r\n") == flood.count(b"NOOP")


def test_stls_writes_ok_before_starting_tls_and_drops_injected_commands(tmp_path):
    app = make_app(tmp_path, tls=True)
    f = build_factory(app, "pop3")
    proto, t = connect(f, transport_class=TLSCapableTransport)
    take(t)
    caps = say(proto, t, b"CAPA\r\n")
    assert b"\r\nSTLS\r\n" in caps
    proto.dataReceived(b"STLS\r\nUSER test\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert t.before_tls == b"+OK begin TLS negotiation\r\n"
    assert t.tls_options is app.tls
    assert take(t) == b"+OK begin TLS negotiation\r\n"     # nothing answered the injection
    assert say(proto, t, b"CAPA\r\n").count(b"STLS") == 0
    assert login(proto, t).endswith(b"(0 octets)\r\n")


def test_require_tls_refuses_plaintext_login(tmp_path):
    app = make_app(tmp_path, tls=True, require_tls=True)
    f = build_factory(app, "pop3")
    proto, t = connect(f, transport_class=TLSCapableTransport)
    take(t)
    assert say(proto, t, b"USER test\r\n").startswith(b"-ERR [AUTH] plaintext login disallowed")


def test_build_factory_checks_tls_configuration(tmp_path):
    app = make_app(tmp_path)
    with pytest.raises(ConfigError, match="listen.pop3s"):
        build_factory(app, "pop3s")
    app2 = make_app(tmp_path / "b", require_tls=True)
    with pytest.raises(ConfigError, match="pop3.require_tls"):
        build_factory(app2, "pop3")
    app3 = make_app(tmp_path / "c", tls=True)
    wrapped = build_factory(app3, "pop3s")
    assert isinstance(wrapped, TLSMemoryBIOFactory)
    assert wrapped.wrappedFactory.implicit_tls
    proto = wrapped.wrappedFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert isinstance(proto, POP3ServerProtocol)


def test_graceful_stop_closes_idle_sessions_and_lets_quit_finish(tmp_path):
    pool = DeferredThreadPool()
    app = make_app(tmp_path, pool=pool)
    names = [deliver(maildir(app), message(i), mtime=1_700_000_000 + i) for i in range(2)]
    f = build_factory(app, "pop3")
    idle, ti = connect(f, "127.0.0.41")
    take(ti)
    quitting, tq = connect(f, "127.0.0.42")
    take(tq)
    login(quitting, tq)
    pool.run_all()
    take(tq)
    quitting.dataReceived(b"DELE 1\r\nQUIT\r\n")     # the update is queued in the pool
    take(tq)
    d = app.drain.start()
    assert take(ti) == b"-ERR [SYS/TEMP] server shutting down\r\n" and ti.disconnecting
    idle.connectionLost(None)
    assert not tq.disconnecting                      # busy in the QUIT update
    pool.run_all()
    assert take(tq) == b"+OK signing off\r\n" and tq.disconnecting
    assert os.listdir(maildir(app) / "cur") == [names[1] + ":2,"]
    quitting.connectionLost(None)
    assert d.called
    late, tl = connect(f, "127.0.0.43")
    assert take(tl) == b"-ERR [SYS/TEMP] server shutting down\r\n" and tl.disconnecting


def test_pipelined_retrs_wait_for_the_client_to_read(app, factory):
    """Thousands of pipelined RETRs of small messages do not build all answers in memory: the
    session answers only while the client reads (at most the transport's buffer plus one flush
    of replies wait unsent)."""
    from mailappliance.netwrite import REPLY_FLUSH_BYTES
    for i in range(60):
        deliver(maildir(app), message(i, 10240), mtime=1_700_000_000 + i)
    proto, t = connect(factory, transport_class=BufferedStringTransport)
    t.drain()
    login(proto, t)
    t.drain()
    proto.dataReceived(b"".join(b"RETR %d\r\n" % (i % 60 + 1) for i in range(600)) + b"NOOP\r\n")
    bursts = [t.unsent]
    while t.producerPaused:
        t.drain()                                               # the client reads
        bursts.append(t.unsent)
    assert t.producerState == "producing"
    assert len(bursts) > 10                                      # it did wait, repeatedly
    assert max(bursts) <= t.bufferSize + REPLY_FLUSH_BYTES + 2 * 11000   # bounded
    t.drain()
    assert t.drained > 600 * 10240
    proto.dataReceived(b"STAT\r\n")
    assert t.drain() == b"+OK 60 %d\r\n" % (60 * 10240)


def test_noop_flood_from_a_client_that_never_reads_is_bounded(app, factory):
    """The issue-18 case the per-pass bound missed: many small answers over many reads. The
    session stops answering, then stops reading once its input backlog is full; the client
    reading everything starts it again."""
    proto, t = connect(factory, transport_class=BufferedStringTransport)
    login(proto, t)
    t.drain()
    for _ in range(200):
        proto.dataReceived(b"NOOP\r\n" * 10000)
        if t.producerState == "paused":
            break
    assert t.producerPaused and t.producerState == "paused"
    assert t.unsent <= t.bufferSize + 64 * 1024
    held = proto.session.pending_input
    proto.dataReceived(b"NOOP\r\n" * 100)        # TLS may still hand over decrypted bytes
    assert t.unsent <= t.bufferSize + 64 * 1024 and proto.session.pending_input > held
    t.drain()
    while t.producerPaused:
        t.drain()
    assert t.producerState == "producing" and proto.session.pending_input < 10


def test_idle_timeout_with_undrained_output_aborts(tmp_path):
    app = make_app(tmp_path)
    for i in range(40):
        deliver(maildir(app), message(i, 10240), mtime=1_700_000_000 + i)
    f = build_factory(app, "pop3")
    proto, t = connect(f, transport_class=BufferedStringTransport)
    login(proto, t)
    proto.dataReceived(b"".join(b"RETR %d\r\n" % (i + 1) for i in range(40)))
    assert t.producerPaused                        # waiting for the client to read
    app.reactor.advance(600)
    assert t.disconnected                           # aborted: no -ERR could get through


@pytest.mark.parametrize("lines", [3, 20_000])
def test_top_of_a_big_message(app, factory, lines):
    """TOP stops reading the file once its lines are out: within the first chunk, or while
    streaming."""
    content = message(1, 3 * 1024 * 1024)
    deliver(maildir(app), content)
    proto, t = connect(factory)
    take(t)
    login(proto, t)
    take(t)
    proto.dataReceived(b"TOP 1 %d\r\nNOOP\r\n" % lines)
    out = [take(t)]
    for _ in range(1000):
        if t.producer is None:
            break
        t.producer.resumeProducing()
        out.append(take(t))
    wire = b"".join(out)
    head, _, body = content.partition(b"\n\n")
    body_lines = body.split(b"\n")[:lines]
    want = head + b"\n\n" + b"".join(line + b"\n" for line in body_lines)
    assert wire == (b"+OK top of message follows\r\n" + want.replace(b"\n", b"\r\n")
                    + b".\r\n+OK\r\n")


def test_parallel_connections_from_one_address_get_the_checks_of_one(app, factory):
    """Ten connections from one address guessing at once, each guessing again as soon as it is
    answered (and reconnecting when closed): the checks take turns, as one connection's would
    (docs/LIMITS.md). Before the turns, every waiting connection checked when the penalty
    ended: ten times the guesses."""
    reactor = app.reactor
    checks: list[float] = []
    real = factory.authenticate

    def counting(login_name, password):
        checks.append(reactor.seconds())
        return real(login_name, password)

    factory.authenticate = counting
    start = reactor.seconds()

    def guess():
        proto, t = connect(factory, "127.0.0.30")
        take(t)
        login(proto, t, b"test", b"wrong-password1")
        return proto, t

    conns = [guess() for _ in range(10)]
    while reactor.seconds() < start + 60:
        reactor.advance(0.5)
        for i, (proto, t) in enumerate(conns):
            answer = t.value()
            if not answer:
                continue
            assert answer.startswith(b"-ERR authorization failed")
            take(t)
            if t.disconnecting:                     # closed after 3 failures: reconnect
                proto.connectionLost(None)
                conns[i] = guess()
            else:
                login(proto, t, b"test", b"wrong-password1")
    times = [c - start for c in checks]
    assert len([s for s in times if s < 20]) <= 4, times   # 0, 2, 6, 14 (one connection's)
    assert len(times) <= 7, times                            # ... 29, 44, 59: 4 a minute
    assert len(set(times)) == len(times)                     # never two at the same moment


def test_connection_limits_per_address_per_endpoint_and_descriptor_share(tmp_path):
    """[pop3] max_per_ip and max_connections, then the endpoint's share of RLIMIT_NOFILE
    (descriptors.py): each refusal is one -ERR [SYS/TEMP] line and a close; a slot frees
    when its connection ends."""
    import dataclasses
    from mailappliance.descriptors import DescriptorBudget, reserve_for
    app = make_app(tmp_path)
    app.live.apply(dataclasses.replace(app.settings, pop3=dataclasses.replace(
        app.settings.pop3, max_per_ip=2, max_connections=3)))
    f = build_factory(app, "pop3")
    a1, ta1 = connect(f, "127.0.0.2")
    a2, _ = connect(f, "127.0.0.2")
    a3, ta3 = connect(f, "127.0.0.2")
    assert take(ta3) == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
    assert ta3.disconnecting
    a3.connectionLost(None)
    b1, tb1 = connect(f, "127.0.0.3")
    assert take(tb1).startswith(b"+OK ")
    c1, tc1 = connect(f, "127.0.0.4")
    assert take(tc1) == b"-ERR [SYS/TEMP] too many connections, try again later\r\n"
    c1.connectionLost(None)
    a1.connectionLost(None)
    assert f.connections == 2 and f.per_ip == {"127.0.0.2": 1, "127.0.0.3": 1}
    app.descriptors = DescriptorBudget(limit=reserve_for(app.settings) + 2)
    d1, td1 = connect(f, "127.0.0.5")
    assert take(td1) == b"-ERR [SYS/TEMP] server out of connection slots, try again later\r\n"


def test_a_trickled_command_line_earns_no_time(app, factory):
    """A byte every 3 s never completes the line: [pop3] timeout from the last complete
    command holds however many bytes arrive (deadline.py)."""
    proto, t = connect(factory)
    take(t)
    assert say(proto, t, b"NOOP\r\n") == b"+OK\r\n"
    for _ in range(199):                    # under MAX_LINE (255)
        app.reactor.advance(3)
        proto.dataReceived(b"x")
    assert not t.disconnecting
    app.reactor.advance(3)
    assert take(t) == b"-ERR autologout: idle for too long\r\n" and t.disconnecting


def test_slow_reader_of_a_big_message_is_cut_off_a_steady_one_is_not(app, factory):
    """A streamed RETR earns time only as the client reads it, at MIN_DATA_RATE per second
    (deadline.py): a reader slower than that is cut off (aborted: nothing more gets through),
    a steady one gets the whole message however long it takes."""
    from mailappliance.deadline import MIN_DATA_RATE
    size = 4 * 1024 * 1024
    deliver(maildir(app), message(1, size))
    deliver(app.store.maildir_for("other", "test.com"), message(1, size))
    readers = {}
    for ip, user in (("127.0.0.51", b"test"), ("127.0.0.52", b"other")):
        proto, t = connect(factory, ip, transport_class=BufferedStringTransport)
        assert login(proto, t, user).endswith(b"+OK maildrop has 1 messages (%d octets)\r\n"
                                              % size)
        t.drain()
        proto.dataReceived(b"RETR 1\r\n")
        readers[ip] = t
    steady, slow = readers["127.0.0.51"], readers["127.0.0.52"]
    chunk = READ_CHUNK
    steady_every = chunk // (2 * MIN_DATA_RATE)          # twice the minimum rate
    slow_every = 4 * chunk // MIN_DATA_RATE              # a quarter of it
    for second in range(1, 4 * size // MIN_DATA_RATE):
        app.reactor.advance(1)
        if second % steady_every == 0 and steady.drained < size:
            steady.drain()
        if second % slow_every == 0 and not slow.disconnected:
            slow.drain()
        if steady.drained >= size and slow.disconnected:
            break
    assert slow.disconnected and slow.drained < size
    assert steady.drained > size and not steady.disconnected
