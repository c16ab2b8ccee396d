"""The SMTP protocol adapter with Twisted doubles: StringTransport per client (each with its own
127.0.0.N peer), a MemoryReactorClock for timers, the real user store and the real queue injector
over a thread pool double, so "250 ok" is checked against what is actually in the queue."""

from __future__ import annotations

import dataclasses
import errno
from types import SimpleNamespace

import pytest

from mailappliance.queue import naming
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailappliance.access.dnsbl import Refusal
from mailappliance.access.rules import parse_rules
from mailappliance.config import Settings, SMTPSettings
from mailappliance.fileops import FileOps
from mailappliance.queue.store import QueueStore
from mailappliance.smtp import protocol as smtp_protocol
from mailappliance.smtp.service import SMTPFactory, build_factory
from mailappliance.testing.app import VERIFY_OFF, build_test_app
from mailappliance.testing.threads import DeferredThreadPool, ImmediateThreadPool, ThreadlessReactor

HOST = "mx.test.com"
PASSWORD = "s3cret-Password"


class FailingWrites(FileOps):
    def write(self, fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")


class World:
    """A real App (testing/app.py) on tmp_path with an SMTP listener's factory; `fields` are
    further Settings fields ([verify] off unless given), `smtp` SMTPSettings fields, `ops` the
    queue's file operations."""

    def __init__(self, tmp_path, *, rules="", pool=None, ops=None, fields=None, **smtp):
        fields = {"verify": VERIFY_OFF, **(fields or {})}
        self.pool = pool or ImmediateThreadPool()
        settings = Settings(hostname=HOST, data=tmp_path, bcrypt_cost=4,
                            smtp=dataclasses.replace(SMTPSettings(), **smtp),
                            rules=parse_rules(rules, "tcp.smtp") if rules else None,
                            **(fields or {}))
        self.app = build_test_app(settings=settings, threadpool=self.pool,
                                  queue_store=QueueStore(tmp_path / "queue", ops=ops))
        self.reactor = self.app.reactor
        self.store = self.app.store
        self.queue = self.app.queue_store
        self.injector = self.app.injector
        self.store.add_domain("test.com")
        self.store.add_user("alice@test.com", PASSWORD)
        self.store.add_alias("sales@test.com", ["alice@test.com"])
        self.factory = build_factory(self.app, "smtp")

    def connect(self, ip="127.0.0.5") -> "Client":
        return Client(self.factory, ip)

    def queued(self):
        out = []
        for qid in self.queue.list_ids():
            env = self.queue.read_envelope(qid)
            out.append((env.sender, [r.address for r in env.recipients],
                        self.queue.read_message(env)))
        return out


class Client:
    def __init__(self, factory, ip):
        addr = (IPv6Address if ":" in ip else IPv4Address)("TCP", ip, 40000)
        self.proto = factory.buildProtocol(addr)
        self.transport = StringTransport(peerAddress=addr)
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def take(self) -> str:
        value = self.transport.value().decode()
        self.transport.clear()
        return value

    def chat(self, data: bytes) -> str:
        self.send(data)
        return self.take()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self):
        self.proto.connectionLost(Failure(ConnectionError()))


def codes(text: str) -> list[int]:
    return [int(line[:3]) for line in text.split("\r\n")[:-1] if line[3] == " "]


TRANSACTION = (b"HELO client.example\r\nMAIL FROM:<bob@remote.example>\r\n"
               b"RCPT TO:<alice@test.com>\r\nDATA\r\n")


# --- delivery into the queue ------------------------------------------------------------------

def test_message_to_local_user_is_queued_with_received_header_before_250(tmp_path):
    w = World(tmp_path)
    c = w.connect("127.0.0.5")
    assert c.take() == "220 mx.test.com ESMTP\r\n"
    assert codes(c.chat(TRANSACTION)) == [250, 250, 250, 354]
    reply = c.chat(b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
    ((sender, rcpts, message),) = w.queued()
    qid = w.queue.list_ids()[0]
    env = w.queue.read_envelope(qid)
    assert reply == f"250 ok 0 qp {naming.message_name(qid, env.token)}\r\n"
    assert env.received_from == "rip=127.0.0.5 helo=client.example auth=- message-id=-"
    assert (sender, rcpts) == ("bob@remote.example", ["alice@test.com"])
    assert message == (b"Received: from unknown (HELO client.example) (127.0.0.5)\n"
                       b"  by mx.test.com with SMTP; Thu, 01 Jan 1970 00:00:00 -0000\n"
                       b"Subject: hi\n\n.dot\n")
    assert c.chat(b"QUIT\r\n") == "221 mx.test.com\r\n" and c.closed
    assert w.app.stats["messages.smtp.accepted"] == 1


def test_250_waits_for_the_commit_and_pipelined_replies_stay_in_order(tmp_path):
    pool = DeferredThreadPool()
    w = World(tmp_path, pool=pool, rules='127.0.0.5:allow,RELAYCLIENT=""\n')
    c = w.connect("127.0.0.5")
    c.take()
    c.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\n")
    c.send(b"one\r\n.\r\nMAIL FROM:<b@remote.example>\r\nRCPT TO:<x@remote.example>\r\n"
           b"RCPT TO:<nobody@test.com>\r\nNOOP\r\n")
    assert codes(c.take()) == [250, 250, 250, 354]          # no 250 before the commit
    assert w.queued() == []
    pool.run_all()
    out = c.take()
    assert codes(out) == [250, 250, 250, 550, 250]
    assert out.startswith("250 2.0.0 ok 0 qp ")
    assert len(w.queued()) == 1


def test_queue_write_error_is_451_and_nothing_is_queued(tmp_path):
    w = World(tmp_path, ops=FailingWrites())
    c = w.connect()
    c.take()
    c.chat(TRANSACTION)
    assert c.chat(b"x" * 70000 + b"\r\n.\r\n") == "451 qq write error or disk full (#4.3.0)\r\n"
    assert w.queued() == [] and not c.closed
    assert w.queue.tmp_files() == []


def test_databytes_overflow_is_552_after_the_dot_and_nothing_is_queued(tmp_path):
    w = World(tmp_path, databytes=1000)
    c = w.connect()
    c.take()
    c.chat(TRANSACTION)
    out = c.chat(b"y" * 600 + b"\r\n" + b"z" * 600 + b"\r\n")
    assert out == ""
    assert c.chat(b".\r\nNOOP\r\n") == (
        "552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n250 ok\r\n")
    w.reactor.advance(1)
    assert w.queued() == [] and w.queue.tmp_files() == []


def test_bare_lf_in_data_is_451_close_and_nothing_is_queued(tmp_path):
    w = World(tmp_path)
    c = w.connect()
    c.take()
    c.chat(TRANSACTION)
    out = c.chat(b"a\r\n\n.\r\nMAIL FROM:<evil@x.example>\r\n")
    assert out == "451 See http://pobox.com/~djb/docs/smtplf.html.\r\n"
    assert c.closed and w.queued() == []


# --- relay control ----------------------------------------------------------------------------

@pytest.mark.parametrize("rcpt, reply", [
    (b"alice@test.com", "250 ok"),
    (b"ALICE@Test.COM", "250 ok"),
    (b"sales@test.com", "250 ok"),                       # alias
    (b"postmaster@test.com", "250 ok"),                  # role alias of the domain
    (b"Postmaster",                                      # = postmaster@mx.test.com: not ours
     "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"),
    (b"nobody@test.com", "550 sorry, no mailbox here by that name (#5.1.1)"),
    (b"x@remote.example", "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"),
    (b"x%remote.example@test.com",
     "550 sorry, no mailbox here by that name; no routing in local parts (#5.1.1)"),
    (b"remote.example!x@test.com",
     "550 sorry, no mailbox here by that name; no routing in local parts (#5.1.1)"),
    (b'"x@remote.example"@test.com',
     "550 sorry, no mailbox here by that name; no routing in local parts (#5.1.1)"),
    (b"@test.com:x@remote.example",
     "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"),
    (b"alice@[127.0.0.1]", "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"),
    (b"x@remote.example.", "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"),
])
def test_rcpt_decisions_without_relay_permission(tmp_path, rcpt, reply):
    w = World(tmp_path)
    c = w.connect()
    c.take()
    c.chat(b"HELO c\r\nMAIL FROM:<alice@test.com>\r\n")     # a local sender grants nothing
    assert c.chat(b"RCPT TO:<" + rcpt + b">\r\n") == reply + "\r\n"


def test_bare_postmaster_means_the_default_domain(tmp_path):
    w = World(tmp_path, fields={"default_domain": "test.com"})
    c = w.connect()
    c.take()
    out = c.chat(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\nhi\r\n.\r\n")
    assert codes(out) == [250, 250, 250, 354, 250]
    assert w.queued()[0][1] == ["postmaster@test.com"]


def test_rules_relayclient_is_per_client_address(tmp_path):
    w = World(tmp_path, rules='127.0.0.7:allow,RELAYCLIENT=""\n:allow\n')
    for ip, code in (("127.0.0.7", 250), ("127.0.0.8", 553), ("127.0.0.1", 553)):
        c = w.connect(ip)
        c.take()
        out = c.chat(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@remote.example>\r\n")
        assert codes(out)[-1] == code, ip


def test_relay_client_still_gets_550_for_unknown_local_users(tmp_path):
    w = World(tmp_path, rules='127.0.0.7:allow,RELAYCLIENT=""\n')
    c = w.connect("127.0.0.7")
    c.take()
    out = c.chat(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<nobody@test.com>\r\n")
    assert codes(out)[-1] == 550


def test_pop_before_smtp_grant_relays_for_that_ip_only_until_it_expires(tmp_path):
    w = World(tmp_path)
    w.app.grants.grant("127.0.0.9", 60)
    probe = b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@remote.example>\r\n"
    c = w.connect("127.0.0.9")
    c.take()
    assert codes(c.chat(probe))[-1] == 250
    other = w.connect("127.0.0.10")
    other.take()
    assert codes(other.chat(probe))[-1] == 553
    w.reactor.advance(61)
    late = w.connect("127.0.0.9")
    late.take()
    assert codes(late.chat(probe))[-1] == 553


def test_deny_rule_closes_without_greeting(tmp_path):
    w = World(tmp_path, rules="127.0.0.66:deny\n:allow\n")
    c = w.connect("127.0.0.66")
    assert c.take() == "" and c.closed
    assert w.factory.connections == 0
    ok = w.connect("127.0.0.67")
    assert ok.take().startswith("220 ")


def test_rules_environment_stays_with_the_session(tmp_path):
    w = World(tmp_path, rules='127.0.0.5:allow,RBLSMTPD="",X_CUSTOM="a b"\n')
    c = w.connect("127.0.0.5")
    assert c.proto.env == {"RBLSMTPD": "", "X_CUSTOM": "a b"}


def test_ipv6_client(tmp_path):
    w = World(tmp_path, rules='::1:allow,RELAYCLIENT=""\n')
    c = w.connect("::1")
    c.take()
    out = c.chat(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\n"
                 b"hi\r\n.\r\n")
    assert codes(out)[-1] == 250
    assert b"(::1)" in w.queued()[0][2]


# --- connection limits and timeouts -----------------------------------------------------------

def test_max_connections_gives_421_and_a_slot_frees_on_close(tmp_path):
    w = World(tmp_path, max_connections=2, max_per_ip=10)
    a, b = w.connect("127.0.0.2"), w.connect("127.0.0.3")
    c = w.connect("127.0.0.4")
    assert c.take() == "421 sorry, too many connections, try again later (#4.3.2)\r\n"
    assert c.closed
    c.lose()
    assert w.factory.connections == 2
    a.lose()
    d = w.connect("127.0.0.4")
    assert d.take().startswith("220 ")
    assert w.app.stats["connections.smtp.now"] == 2


def test_max_per_ip_gives_421(tmp_path):
    w = World(tmp_path, max_per_ip=2)
    w.connect("127.0.0.2"), w.connect("127.0.0.2")
    c = w.connect("127.0.0.2")
    assert c.take() == "421 sorry, too many connections from your address (#4.7.0)\r\n"
    assert w.connect("127.0.0.3").take().startswith("220 ")


def test_descriptor_share_gives_421_and_submission_has_its_own_limits(tmp_path):
    """Past the endpoint's share of RLIMIT_NOFILE (descriptors.py) a client gets 421, not an
    accept() that fails with EMFILE; submission counts against [submission], not [smtp]."""
    from mailappliance.config import SubmissionSettings
    from mailappliance.descriptors import DescriptorBudget, reserve_for
    w = World(tmp_path, fields={"submission": SubmissionSettings(max_per_ip=1)})
    w.app.descriptors = DescriptorBudget(limit=reserve_for(w.app.settings) + 3)
    assert w.app.descriptors.share(w.app.settings, "smtp") == 1   # 3 left for 2 x 40 (+ 40)
    first = w.connect("127.0.0.2")
    assert first.take().startswith("220 ")
    c = w.connect("127.0.0.3")
    assert c.take() == ("421 sorry, the server is out of connection slots, try again later"
                        " (#4.3.2)\r\n") and c.closed
    sub = build_factory(w.app, "submission")
    one = Client(sub, "127.0.0.4")
    assert one.take().startswith("220 ")
    assert Client(sub, "127.0.0.4").take().startswith("421 sorry, too many connections from")


def test_idle_client_gets_451_timeout_and_is_closed(tmp_path):
    w = World(tmp_path, timeout=30)
    c = w.connect()
    c.take()
    w.reactor.advance(20)
    c.chat(b"NOOP\r\n")
    w.reactor.advance(20)                                   # 20 s since the last byte
    assert not c.closed
    w.reactor.advance(10)
    assert c.take() == "451 timeout (#4.4.2)\r\n" and c.closed


def test_a_trickled_command_line_earns_no_time(tmp_path):
    """One byte a second never completes the line: the request deadline ([smtp] timeout from
    the last complete command) holds however many bytes arrive (deadline.py; before issue
    18 every byte restarted the clock)."""
    w = World(tmp_path, timeout=30)
    c = w.connect()
    c.take()
    c.chat(b"NOOP\r\n")
    for _ in range(29):
        w.reactor.advance(1)
        c.send(b"x")
    assert not c.closed
    w.reactor.advance(1)
    assert c.take() == "451 timeout (#4.4.2)\r\n" and c.closed


def test_message_content_earns_time_only_at_the_minimum_rate(tmp_path):
    """DATA content earns 1 s per MIN_DATA_RATE bytes (Postfix smtpd_min_data_rate): a
    transfer at that rate goes on past the timeout, a slower one is cut off."""
    from mailappliance.deadline import MIN_DATA_RATE
    w = World(tmp_path, timeout=30)
    fast, slow = w.connect("127.0.0.2"), w.connect("127.0.0.3")
    for c in (fast, slow):
        c.take()
        assert codes(c.chat(TRANSACTION)) == [250, 250, 250, 354]
    line = b"x" * (MIN_DATA_RATE - 2) + b"\r\n"            # one second's worth
    for _ in range(90):                                      # three timeouts long
        w.reactor.advance(1)
        fast.send(line)
        if not slow.closed:
            slow.send(b"y" * (MIN_DATA_RATE // 4))           # a quarter of the rate
    assert not fast.closed
    assert slow.take() == "451 timeout (#4.4.2)\r\n" and slow.closed
    assert codes(fast.chat(b".\r\n")) == [250]


def test_session_lifetime_ends_even_a_busy_session(tmp_path):
    from mailappliance.deadline import SMTP_SESSION_LIFETIME
    w = World(tmp_path, timeout=30)
    c = w.connect()
    c.take()
    for _ in range(SMTP_SESSION_LIFETIME // 20 - 1):
        w.reactor.advance(20)
        assert codes(c.chat(b"NOOP\r\n")) == [250]
    w.reactor.advance(20)
    assert c.take() == "451 timeout (#4.4.2)\r\n" and c.closed


def test_timeout_does_not_fire_while_we_are_committing(tmp_path):
    pool = DeferredThreadPool()
    w = World(tmp_path, timeout=30, pool=pool)
    c = w.connect()
    c.take()
    c.chat(TRANSACTION + b"x\r\n.\r\n")
    w.reactor.advance(31)
    assert not c.closed
    pool.run_all()
    assert c.take().startswith("250 ok 31 qp ")


def test_greetdelay_refuses_a_client_that_talks_first(tmp_path):
    w = World(tmp_path, rules='127.0.0.5:allow,GREETDELAY="2"\n')
    eager = w.connect("127.0.0.5")
    assert eager.take() == ""
    assert eager.chat(b"EHLO spam\r\n") == "554 sorry, you talked before my greeting (#5.5.1)\r\n"
    assert eager.closed
    patient = w.connect("127.0.0.5")
    w.reactor.advance(2)
    assert patient.take() == "220 mx.test.com ESMTP\r\n"


def test_client_disconnect_during_data_discards_the_message(tmp_path):
    w = World(tmp_path)
    c = w.connect()
    c.take()
    c.chat(TRANSACTION + b"x" * 100000)
    c.lose()
    w.reactor.advance(1)
    assert w.queued() == [] and w.queue.tmp_files() == []
    assert w.factory.connections == 0


def test_pipelined_flood_while_waiting_pauses_reading(tmp_path):
    pool = DeferredThreadPool()
    w = World(tmp_path, pool=pool)
    c = w.connect()
    c.take()
    c.send(TRANSACTION + b"x\r\n.\r\n")
    for _ in range(80):
        c.send(b"NOOP\r\n" * 200)
    assert c.transport.producerState == "paused"
    pool.run_all()
    assert c.transport.producerState == "producing"
    assert codes(c.take()).count(250) == 4 + 80 * 200


def test_lookup_failure_is_451(tmp_path):
    import sqlite3

    class BrokenStore:
        def lookup_recipient(self, address):
            raise sqlite3.OperationalError("disk I/O error")

        def has_domain(self, name):
            raise sqlite3.OperationalError("disk I/O error")

    w = World(tmp_path)
    w.app.store = BrokenStore()
    c = w.connect()
    c.take()
    out = c.chat(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@test.com>\r\n")
    assert out.endswith("451 sorry, temporary failure looking up the recipient (#4.3.0)\r\n")


def test_no_injector_means_451_at_data(tmp_path):
    w = World(tmp_path)
    w.app.injector = None
    c = w.connect()
    c.take()
    assert c.chat(TRANSACTION).endswith("451 qq temporary problem (#4.3.0)\r\n")


# --- DNSBL seam -------------------------------------------------------------------------------

class FakeDNSBL:
    def __init__(self):
        self.calls = []

    def check(self, ip, env):
        d = defer.Deferred()
        self.calls.append((ip, dict(env), d))
        return d


def test_dnsbl_verdict_is_awaited_at_rcpt_and_greeting_is_not_delayed(tmp_path):
    w = World(tmp_path)
    w.app.dnsbl = bl = FakeDNSBL()
    c = w.connect("127.0.0.2")
    assert c.take() == "220 mx.test.com ESMTP\r\n"
    assert bl.calls[0][0] == "127.0.0.2"
    out = c.chat(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@test.com>\r\n"
                 b"RCPT TO:<bob@test.com>\r\nDATA\r\nNOOP\r\n")
    assert codes(out) == [250, 250]                     # as rblsmtpd: MAIL gets its 250
    bl.calls[0][2].callback(Refusal(False, "listed at bl.example: see http://bl.example/"))
    out = c.take()
    # Every RCPT gets the refusal, so DATA has no recipient; replies stay in command order.
    assert out.startswith("451 listed at bl.example: see http://bl.example/\r\n"
                          "451 listed at bl.example: see http://bl.example/\r\n")
    assert codes(out)[2] in (503, 554) and codes(out)[3:] == [250]
    assert not list((tmp_path).rglob("queue/mess/*/*"))


def test_dnsbl_verdict_known_before_rcpt_refuses_at_once(tmp_path):
    w = World(tmp_path)
    w.app.dnsbl = bl = FakeDNSBL()
    c = w.connect("127.0.0.2")
    c.take()
    bl.calls[0][2].callback(Refusal(False, "listed"))
    assert codes(c.chat(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")) == [250, 250]
    assert c.chat(b"RCPT TO:<alice@test.com>\r\n") == "451 4.7.1 listed\r\n"
    assert c.chat(b"RSET\r\n").startswith("250")


def test_dnsbl_not_listed_lets_mail_through(tmp_path):
    w = World(tmp_path)
    w.app.dnsbl = bl = FakeDNSBL()
    c = w.connect()
    c.take()
    c.send(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@test.com>\r\n")
    assert codes(c.take()) == [250, 250]                # RCPT waits for the verdict
    bl.calls[0][2].callback(None)
    assert codes(c.take()) == [250]
    assert codes(c.chat(b"RCPT TO:<alice@test.com>\r\n")) == [250]


def test_dnsbl_permanent_refusal_and_grant_env(tmp_path):
    w = World(tmp_path)
    w.app.dnsbl = bl = FakeDNSBL()
    w.app.grants.grant("127.0.0.3", 60)
    c = w.connect("127.0.0.3")
    assert bl.calls[0][1] == {"RELAYCLIENT": "", "RBLSMTPD": ""}
    bl.calls[0][2].callback(Refusal(True, "go away"))
    c.take()
    out = c.chat(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@remote.example>\r\n")
    assert out.endswith("553 go away\r\n")


def test_dnsbl_failure_fails_open(tmp_path):
    w = World(tmp_path)
    w.app.dnsbl = bl = FakeDNSBL()
    c = w.connect()
    c.take()
    bl.calls[0][2].errback(RuntimeError("boom"))
    assert codes(c.chat(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<alice@test.com>\r\n")) \
        == [250, 250, 250]


def test_factory_refuses_unknown_kind(tmp_path):
    w = World(tmp_path)
    with pytest.raises(ValueError):
        SMTPFactory(w.app, "pop3")
    assert build_factory(w.app, "submission").kind == "submission"


# --- graceful stop (mailappliance/drain.py) ----------------------------------------------------

def test_drain_closes_idle_sessions_and_lets_a_transfer_finish(tmp_path):
    w = World(tmp_path)
    drain = w.app.drain
    idle = w.connect("127.0.0.2")
    busy = w.connect("127.0.0.3")
    idle.take(), busy.take()
    busy.chat(TRANSACTION + b"first part\r\n")
    drain.start()
    assert idle.take() == "421 sorry, the server is shutting down (#4.3.2)\r\n" and idle.closed
    assert not busy.closed
    out = busy.chat(b"second part\r\n.\r\nNOOP\r\n")
    assert codes(out) == [250, 421] and busy.closed
    assert len(w.queued()) == 1
    late = w.connect("127.0.0.4")
    assert late.take() == "421 sorry, the server is shutting down (#4.3.2)\r\n" and late.closed


@pytest.mark.parametrize("description, expected", [
    ("tcp:2525:interface=127.0.0.1", "tcp:2525:interface=127.0.0.1:backlog=1024"),
    ("tcp6:25", "tcp6:25:backlog=1024"),
    ("tcp:25:backlog=20", "tcp:25:backlog=20"),          # the operator's choice stays
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
])
def test_listen_backlog_is_raised_for_tcp_listeners(description, expected):
    from mailappliance.smtp.service import build_endpoint, listen_description
    assert listen_description(description) == expected
    ep = build_endpoint(None, "smtp", "tcp:0:interface=127.0.0.1", ThreadlessReactor())
    assert ep._backlog == 1024


def test_direct_write_keeps_order_when_the_kernel_takes_only_part(tmp_path):
    """protocol._write sends at once on a plain TCP transport; what the socket buffer cannot
    take goes through transport.write, and later writes queue behind it, never overtake it."""
    import socket

    from twisted.internet import tcp
    from twisted.internet.testing import MemoryReactor

    w = World(tmp_path)
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setblocking(False)
    proto = w.factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 1))
    transport = tcp.Server(ours, proto, ("127.0.0.2", 1), None, 1, MemoryReactor())
    transport.getPeer = lambda: IPv4Address("TCP", "127.0.0.2", 1)
    proto.transport = transport
    big = bytes(range(256)) * 4096                      # 1 MiB: more than the socket takes
    proto._write(big)
    assert transport._tempDataBuffer                    # the rest waits in Twisted's buffer
    proto._write(b"TAIL")                               # must queue behind, not jump ahead
    received = b""
    for _ in range(10_000):
        try:
            received += peer.recv(1 << 20)
        except BlockingIOError:
            pass
        if transport._tempDataBuffer or transport.offset < len(transport.dataBuffer):
            transport.doWrite()
        if len(received) >= len(big) + 4:
            break
    assert received == big + b"TAIL"
    ours.close(), peer.close()


# --- STARTTLS (RFC 3207) -----------------------------------------------------------------------

class TLSRecordingTransport(StringTransport):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tls_started_after = None

    def startTLS(self, options):
        self.tls_started_after = (self.value(), options)


def test_starttls_sends_220_then_handshakes_and_drops_pipelined_commands(tmp_path):
    w = World(tmp_path)
    w.app.tls = SimpleNamespace(options=lambda: "tls-options")
    addr = IPv4Address("TCP", "127.0.0.2", 1)
    proto = w.factory.buildProtocol(addr)
    t = TLSRecordingTransport(peerAddress=addr)
    proto.makeConnection(t)
    proto.dataReceived(b"EHLO c\r\n")
    assert t.value().endswith(b"250 STARTTLS\r\n")
    t.clear()
    proto.dataReceived(b"STARTTLS\r\nMAIL FROM:<injected@x.example>\r\nRSET\r\n")
    assert t.tls_started_after == (b"220 2.0.0 ready to start TLS\r\n", "tls-options")
    assert t.value() == b"220 2.0.0 ready to start TLS\r\n"       # nothing for the injection
    t.clear()
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\n")
    assert t.value() == b"250 ok\r\n"            # no enhanced codes: the EHLO was forgotten
    proto.dataReceived(b"RSET\r\nEHLO c\r\n")
    assert b"STARTTLS" not in t.value()
    proto.dataReceived(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\nx\r\n.\r\n")
    assert b"with ESMTPS;" in w.queued()[0][2]


def test_starttls_not_offered_without_tls(tmp_path):
    w = World(tmp_path)
    c = w.connect()
    c.take()
    assert "STARTTLS" not in c.chat(b"EHLO c\r\n")
    assert c.chat(b"STARTTLS\r\n") == "502 5.5.1 unimplemented (#5.5.1)\r\n"


def test_submissions_needs_tls_and_is_wrapped(tmp_path):
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailappliance.config import ConfigError
    w = World(tmp_path)
    with pytest.raises(ConfigError):
        build_factory(w.app, "submissions")
    from mailappliance.config import TLSSettings
    from mailappliance.tls import TLSContext
    from tests.pop3_support import make_cert
    cert, key = make_cert(tmp_path / "tls")
    w.app.tls = TLSContext(TLSSettings(cert=cert, key=key))
    wrapped = build_factory(w.app, "submissions")
    assert isinstance(wrapped, TLSMemoryBIOFactory)
    assert wrapped.wrappedFactory.kind == "submissions"


def test_half_close_after_quit_is_answered(tmp_path):
    w = World(tmp_path)
    c = w.connect()
    c.take()
    c.transport.clear()
    c.proto.dataReceived(b"HELO c\r\nQUIT\r\n"[:8])
    c.proto.dataReceived(b"HELO c\r\nQUIT\r\n"[8:])
    c.proto.readConnectionLost()
    assert codes(c.take()) == [250, 221] and c.closed


def test_half_close_mid_command_closes(tmp_path):
    w = World(tmp_path)
    c = w.connect()
    c.take()
    c.send(b"NOOP\r\nNO")
    c.proto.readConnectionLost()
    assert c.take() == "250 ok\r\n" and c.closed


def test_slow_disk_pauses_reading_until_the_writer_drains(tmp_path):
    pool = DeferredThreadPool()
    w = World(tmp_path, pool=pool, databytes=50_000_000)
    c = w.connect()
    c.take()
    c.chat(TRANSACTION)
    line = b"x" * 998 + b"\r\n"
    sent = 0
    while c.transport.producerState == "producing" and sent < 10_000:
        c.send(line)                            # no write completes meanwhile
        sent += 1
    # A real transport stops calling dataReceived here; memory stays at the backlog bound.
    assert c.transport.producerState == "paused"
    assert c.proto._writer.pending_bytes <= smtp_protocol.MAX_WRITER_BACKLOG + len(line) + 600
    pool.run_all()
    w.reactor.advance(smtp_protocol.WRITER_BACKLOG_POLL)
    assert c.transport.producerState == "producing"
    c.send(b".\r\n")
    pool.run_all()
    assert codes(c.take()) == [250]
    assert len(w.queued()[0][2]) > sent * 999


# --- a client that never reads (docs/LIMITS.md) -------------------------------------------------

def test_client_that_never_reads_gets_no_more_answers_and_is_no_longer_read(tmp_path):
    """Pipelined EHLOs from a client that reads nothing: the session answers until the
    transport's buffer is full (plus one flush), then answers nothing and, once its input
    backlog is full too, stops reading; when the client reads, it goes on where it stopped."""
    from mailappliance.netwrite import REPLY_FLUSH_BYTES
    from mailappliance.testing.transport import BufferedStringTransport
    w = World(tmp_path)
    addr = IPv4Address("TCP", "127.0.0.5", 40000)
    proto = w.factory.buildProtocol(addr)
    t = BufferedStringTransport(peerAddress=addr)
    proto.makeConnection(t)
    assert t.producer is proto and t.streaming
    burst = b"EHLO x\r\n" * 8192                        # one 64 KiB read
    proto.dataReceived(burst)
    assert t.producerPaused and t.producerState == "producing"
    assert t.unsent <= t.bufferSize + REPLY_FLUSH_BYTES + 512
    answered = t.unsent
    sent = 1
    while t.producerState == "producing":              # the reactor reads only while asked
        proto.dataReceived(burst)
        sent += 1
    assert t.unsent == answered                         # nothing more answered
    assert sent <= 3                                    # and soon no longer read
    assert proto.core.buffered <= smtp_protocol.MAX_PIPELINED_INPUT + 2 * len(burst)
    total = 0
    while t.producerPaused or t.unsent:
        total += t.drain().count(b"250 ")              # the client reads, a bit at a time
    assert total == sent * 8192                         # every command answered, in the end
    assert t.producerState == "producing"
    proto.dataReceived(b"QUIT\r\n")
    assert t.drain().startswith(b"221 ") and t.disconnecting and t.producer is None


def test_timeout_with_unread_replies_aborts(tmp_path):
    """A 421 cannot reach a client that reads nothing: the timeout drops the connection."""
    from mailappliance.testing.transport import BufferedStringTransport
    w = World(tmp_path)
    addr = IPv4Address("TCP", "127.0.0.5", 40000)
    proto = w.factory.buildProtocol(addr)
    t = BufferedStringTransport(peerAddress=addr)
    proto.makeConnection(t)
    proto.dataReceived(b"EHLO x\r\n" * 8192)
    assert t.producerPaused
    w.reactor.advance(w.app.settings.smtp.timeout)
    assert t.disconnected and t.producer is None
