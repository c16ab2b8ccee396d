"""The admin protocol adapter with Twisted doubles: commands against a real user store,
secrets, back-pressure, timeouts, TCP token and loopback rules, reload."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mailappliance.admin import protocol as ap
from mailappliance.admin import service as adm
from mailappliance.config import load_settings
from mailappliance.queue import naming
from mailappliance.queue.store import QueueStore
from mailappliance.testing.app import build_test_app
from mailappliance.testing.threads import DeferredThreadPool

PASSWORD = "Adm1n-Secret!"


def plain_settings(tmp_path):
    return load_settings(None, {"data": str(tmp_path / "var"), "bcrypt_cost": 4,
                                "hostname": "mx.test.com"}, cwd=tmp_path)


@pytest.fixture
def app(tmp_path):
    a = build_test_app(settings=plain_settings(tmp_path))
    yield a
    a.store.close()


@pytest.fixture
def captured():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def connect(factory, addr=None):
    addr = addr or UNIXAddress(b"/tmp/admin.sock")
    proto = factory.buildProtocol(addr)
    if proto is None:
        return None, None
    tr = StringTransport(peerAddress=addr)
    proto.makeConnection(tr)
    return proto, tr


def replies(tr: StringTransport) -> list[tuple[bool, list[str]]]:
    r = ap.ReplyReader()
    r.receive_data(tr.value())
    tr.clear()
    return r.replies


def talk(proto, tr, text: str):
    proto.dataReceived(text.encode())
    return replies(tr)


def test_help_lists_the_grammar_table(app):
    proto, tr = connect(adm.build_factory(app, "admin"))
    [(ok, lines)] = talk(proto, tr, "help\n")
    assert ok and lines == ap.help_lines()


def test_store_commands_work_and_the_password_is_never_echoed_or_logged(app, captured):
    proto, tr = connect(adm.build_factory(app, "admin"))
    out = talk(proto, tr, "domain add test.com\n"
                          f"user add test@test.com --quota 5000\n{PASSWORD}\n"
                          "user list\n"
                          f"user passwd test@test.com\n{PASSWORD}2\n"
                          "alias add info@test.com test@test.com far@example.org\n"
                          "alias list\n"
                          "domain list\n")
    assert out == [
        (True, ["domain test.com added"]),
        (True, ["user test@test.com added"]),
        (True, ["test@test.com quota=5000"]),
        (True, ["password of test@test.com changed"]),
        (True, ["alias info@test.com added"]),
        (True, ["abuse@test.com -> test@test.com", "info@test.com -> test@test.com "
                "far@example.org", "mailer-daemon@test.com -> test@test.com",
                "postmaster@test.com -> test@test.com"]),
        (True, ["test.com"]),
    ]
    assert app.store.check_password("test@test.com", PASSWORD + "2") is not None
    logged = repr(captured)
    assert "user add test@test.com --quota 5000" in logged
    assert PASSWORD not in logged


def test_store_refusals_are_error_lines_and_the_session_goes_on(app):
    proto, tr = connect(adm.build_factory(app, "admin"))
    out = talk(proto, tr, "user add nobody@nowhere.test\nweakpw\n"
                          "domain add test.com\n"
                          "user add a@test.com\nshort\n"
                          "user del ghost@test.com\n"
                          "domain add ../etc\n"
                          "stat\n")
    assert out[0] == (False, ["error: password too short: at least 8 characters"])
    assert out[1] == (True, ["domain test.com added"])
    assert out[2] == (False, ["error: password too short: at least 8 characters"])
    assert out[3] == (False, ["error: no such user: ghost@test.com"])
    assert out[4][0] is False and out[4][1][0].startswith("error: bad domain name")
    assert out[5][0] is True


def test_one_command_at_a_time_reading_paused_while_it_runs(tmp_path):
    app = build_test_app(settings=plain_settings(tmp_path), threadpool=DeferredThreadPool())
    proto, tr = connect(adm.build_factory(app, "admin"))
    proto.dataReceived(b"domain list\nhelp\n")
    assert tr.value() == b""                      # domain list waits for the pool
    assert tr.producerState == "paused"           # and nothing more is read meanwhile
    app.threadpool.run_all()
    out = replies(tr)
    assert out[0] == (True, []) and out[1][1] == ap.help_lines()
    assert tr.producerState == "producing"


def test_a_client_that_does_not_read_stops_command_processing(app):
    proto, tr = connect(adm.build_factory(app, "admin"))
    proto.pauseProducing()                        # what the transport does when its buffer fills
    assert tr.producerState == "paused"
    proto.dataReceived(b"help\n" * 50)
    assert tr.value() == b""                      # no reply is produced while paused
    proto.resumeProducing()
    assert len(replies(tr)) == 50


def test_idle_timeout_closes_and_a_non_reading_client_is_aborted(app):
    factory = adm.build_factory(app, "admin")
    proto, tr = connect(factory)
    app.reactor.advance(adm.IDLE_TIMEOUT - 1)
    proto.dataReceived(b"help\n")                 # activity resets the timer
    app.reactor.advance(adm.IDLE_TIMEOUT - 1)
    assert not tr.disconnecting
    tr.clear()
    app.reactor.advance(2)
    assert tr.disconnecting
    assert tr.value() == b"error: idle timeout, closing\n.\n"

    trickler, tt = connect(factory)             # bytes that never end a line earn nothing
    for _ in range(int(adm.IDLE_TIMEOUT) - 1):
        app.reactor.advance(1)
        trickler.dataReceived(b"x")
    assert not tt.disconnecting
    app.reactor.advance(1)
    assert tt.disconnecting

    proto2, tr2 = connect(factory)
    proto2.pauseProducing()
    app.reactor.advance(adm.IDLE_TIMEOUT + 1)
    assert tr2.disconnected                       # abortConnection: no polite goodbye


def test_connections_are_counted_in_stats(app):
    factory = adm.build_factory(app, "admin")
    p1, _ = connect(factory)
    p2, _ = connect(factory)
    assert app.stats["connections.admin.now"] == 2
    p1.connectionLost(None)
    assert (app.stats["connections.admin.now"], app.stats["connections.admin.total"]) == (1, 2)


def test_connection_limit(app):
    factory = adm.build_factory(app, "admin")
    protos = [connect(factory)[0] for _ in range(adm.MAX_CONNECTIONS)]
    assert all(isinstance(p, adm.AdminProtocol) for p in protos)
    refused = factory.buildProtocol(UNIXAddress(b"x"))
    tr = StringTransport()
    refused.makeConnection(tr)
    assert tr.value() == adm.encode_error("too many admin connections, try again later")
    assert tr.disconnecting
    protos[0].connectionLost(None)
    assert isinstance(factory.buildProtocol(UNIXAddress(b"x")), adm.AdminProtocol)


def test_quit_replies_and_closes(app):
    proto, tr = connect(adm.build_factory(app, "admin"))
    assert talk(proto, tr, "quit\nhelp\n") == [(True, ["bye"])]
    assert tr.disconnecting


def test_garbage_gets_errors_then_the_connection_is_closed(app):
    proto, tr = connect(adm.build_factory(app, "admin"))
    out = talk(proto, tr, "\x01\x02\n" * (ap.MAX_ERRORS + 3))
    assert len(out) == ap.MAX_ERRORS and all(not ok for ok, _ in out)
    assert tr.disconnecting


def test_a_huge_line_gets_one_error_and_the_next_command_works(app):
    proto, tr = connect(adm.build_factory(app, "admin"))
    for _ in range(100):
        proto.dataReceived(b"z" * 65536)
    assert proto.core.buffered() <= ap.MAX_LINE
    proto.dataReceived(b"\nhelp\n")
    out = replies(tr)
    assert out[0] == (False, [f"error: line too long (limit {ap.MAX_LINE} octets)"])
    assert out[1][0] is True


# --- TCP: loopback only, token required ------------------------------------------------------

@pytest.fixture
def tcp_app(tmp_path):
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[listen]\nadmin = ["tcp:0:interface=127.0.0.1"]\n'
                   f'[admin]\ntoken_file = "{token}"\n')
    settings = load_settings(cfg, {"data": str(tmp_path / "var"), "bcrypt_cost": 4},
                             cwd=tmp_path)
    a = build_test_app(settings=settings)
    yield a
    a.store.close()


def test_tcp_refuses_non_loopback_peers(tcp_app):
    factory = adm.build_factory(tcp_app, "admin")
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 5555)) is None
    assert factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 5555)) is None
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 5555)) is not None
    assert factory.buildProtocol(IPv6Address("TCP", "::ffff:127.0.0.1", 5555)) is not None


def test_tcp_needs_the_token_first(tcp_app, captured):
    factory = adm.build_factory(tcp_app, "admin")
    proto, tr = connect(factory, IPv4Address("TCP", "127.0.0.1", 4444))
    out = talk(proto, tr, "stat\nauth\n0123456789abcdef0123456789abcdef\ndomain list\n")
    assert out == [
        (False, ["error: authenticate first: auth, then the token on the next line"]),
        (True, ["authenticated"]),
        (True, []),
    ]
    assert "0123456789abcdef" not in repr(captured)


def test_tcp_wrong_token_closes_after_one_try(tcp_app):
    factory = adm.build_factory(tcp_app, "admin")
    proto, tr = connect(factory, IPv4Address("TCP", "127.0.0.1", 4444))
    out = talk(proto, tr, "auth\nwrong-token-wrong-token\nauth\n0123456789abcdef0123456789abcdef\n")
    assert out == [(False, ["error: authentication failed"])]
    assert tr.disconnecting


def test_a_short_token_file_is_refused(tmp_path):
    p = tmp_path / "t"
    p.write_text("short\n")
    with pytest.raises(adm.ConfigError, match="at least 16 characters"):
        adm.read_token(p)


# --- queue and relay -------------------------------------------------------------------------

def test_queue_list_and_stat_read_the_queue_directory(tmp_path):
    store = QueueStore(tmp_path / "var" / "queue", clock=lambda: 1_700_000_000.0)
    app = build_test_app(settings=plain_settings(tmp_path), queue_store=store)
    qid = store.inject(b"Subject: x\n\nbody\n", "a@test.com", ["b@example.org", "c@test.com"],
                       trigger=False)
    factory = adm.build_factory(app, "admin")
    factory.clock = lambda: 1_700_000_600.0
    proto, tr = connect(factory)
    (ok, qlines), (ok2, slines) = talk(proto, tr, "queue list\nstat\n")
    name = naming.message_name(qid, store.read_envelope(qid).token)
    assert ok and qlines[0].startswith(f"{name}  14 Nov 2023 22:13:20 GMT  age 10m00s  ")
    assert qlines[1:] == ["  queued  b@example.org", "  queued  c@test.com", "1 messages"]
    assert ok2 and "messages in queue: 1" in slines
    # The count is the directory's; the rest is the manager's (not started here: it has
    # picked up nothing and delivers nothing).
    assert "messages in queue but not yet preprocessed: 0" in slines
    assert "status: local 0/10 remote 0/20" in slines


def test_queue_flush_and_remove_go_to_the_manager(app):
    proto, tr = connect(adm.build_factory(app, "admin"))
    out = talk(proto, tr, "queue flush\nqueue remove 12 --bounce\n")
    assert out == [(True, ["0 deferred messages scheduled for delivery now"]),
                   (False, ["error: message 12: unknown (not in the queue)"])]


def test_relay_list_shows_current_grants(app):
    app.grants.grant("192.0.2.1", 1800)
    app.grants.grant("198.51.100.2", 60)
    proto, tr = connect(adm.build_factory(app, "admin"))
    [(ok, lines)] = talk(proto, tr, "relay list\n")
    assert ok and lines[-1] == "2 grants"
    assert lines[0].startswith("198.51.100.2  expires in ")
    assert lines[1].startswith("192.0.2.1  expires in ")


# --- reload ----------------------------------------------------------------------------------

def test_reload_good_and_bad_config(tmp_path):
    rules = tmp_path / "tcp.smtp"
    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[smtp]\nrules = "{rules}"\nmax_recipients = 50\n')
    settings = load_settings(cfg, {"data": str(tmp_path / "var"), "bcrypt_cost": 4},
                             cwd=tmp_path)
    app = build_test_app(settings=settings)
    seen = []
    app.reload_hooks.append(seen.append)
    proto, tr = connect(adm.build_factory(app, "admin"))

    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n10.0.0.0/8:deny\n:allow\n')
    [(ok, lines)] = talk(proto, tr, "reload\n")
    assert ok and lines == [f"configuration reloaded from {cfg}", f"3 rules from {rules}"]
    assert app.settings.rules.count == 3 and len(seen) == 1

    cfg.write_text(f'[smtp]\nrules = "{rules}"\nmax_recipients = "many"\n')
    [(ok, lines)] = talk(proto, tr, "reload\n")
    assert not ok
    assert lines == [f"error: reload refused: {cfg}: smtp.max_recipients: expected integer, "
                     "got string; the old configuration stays in force"]
    assert app.settings.smtp.max_recipients == 50 and len(seen) == 1
    app.store.close()


def test_thousands_of_pipelined_commands_in_one_read_all_get_replies(app):
    """Synchronous commands finishing inside the command loop must not recurse."""
    proto, tr = connect(adm.build_factory(app, "admin"))
    out = talk(proto, tr, "relay list\n" * 5000)
    assert len(out) == 5000 and all(ok for ok, _ in out)


def test_per_address_limit_on_tcp_endpoints(tmp_path):
    import dataclasses
    s = plain_settings(tmp_path)
    app = build_test_app(settings=dataclasses.replace(
        s, admin=dataclasses.replace(s.admin, max_per_ip=2)))
    factory = adm.build_factory(app, "admin")
    mine = [connect(factory, IPv4Address("TCP", "127.0.0.1", 5000 + i))[0] for i in range(2)]
    assert all(isinstance(p, adm.AdminProtocol) for p in mine)
    refused = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5002))
    assert isinstance(refused, adm._Refusal) and "your address" in refused.why
    other = factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 5003))
    assert isinstance(other, adm.AdminProtocol)
    assert isinstance(factory.buildProtocol(UNIXAddress(b"x")), adm.AdminProtocol)
    app.store.close()
