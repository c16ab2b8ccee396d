"""The scanning clients and policy against real daemons: Debian's clamd and rspamd, each
started privately by tests/scanners.py (session-wide in tests/conftest.py, or per test where
the test kills it). Real unix sockets, the real reactor."""

from __future__ import annotations

import base64
import time
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from twisted.internet import defer, reactor, tcp
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from mailappliance.scan.clamd import END_OF_STREAM
from mailappliance.scan.client import ClamdScanner, RspamdScorer
from mailappliance.scan.policy import Scanning
from mailappliance.scan.verdict import Outcome
from mailappliance.testing.scanners import EICAR, SPAM_TOKEN
from tests.scanners import (
    EICAR_BODY_NAME, EICAR_HASH_NAME, STREAM_MAX, SUSPECT_TOKEN, ClamdDaemon, SilentServer)

EICAR_NAMES = {f"{EICAR_HASH_NAME}.UNOFFICIAL", f"{EICAR_BODY_NAME}.UNOFFICIAL"}


def stored(msg) -> bytes:
    """A message in the queue's stored form (LF line ends), as SMTP hands it to scanning."""
    return msg.as_bytes().replace(b"\r\n", b"\n")


def clean_message() -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.org", "b@test.com", "hello"
    m["Message-ID"] = "<clean@example.org>"
    m.set_content("Just a friendly note.\n")
    return stored(m)


def eicar_in_body() -> bytes:
    return (b"From: a@example.org\nSubject: test\nMessage-ID: <body@example.org>\n\n"
            b"see below\n" + EICAR + b"\n")


def eicar_attachment() -> bytes:
    m = MIMEMultipart()
    m["Subject"], m["Message-ID"] = "attached", "<attachment@example.org>"
    m.attach(MIMEText("see the attachment\n"))
    m.attach(MIMEApplication(EICAR, Name="eicar.com"))          # base64 by default
    data = stored(m)
    assert EICAR not in data and base64.b64encode(EICAR)[:20] in data
    return data


def eicar_nested() -> bytes:
    inner = MIMEMultipart("mixed")
    inner["Subject"] = "inner"
    alt = MIMEMultipart("alternative")
    alt.attach(MIMEText("plain part\n"))
    alt.attach(MIMEText("<p>html part</p>", "html"))
    inner.attach(alt)
    inner.attach(MIMEApplication(EICAR, Name="eicar.com"))
    outer = MIMEMultipart("mixed")
    outer["Subject"], outer["Message-ID"] = "forwarded", "<nested@example.org>"
    outer.attach(MIMEText("forwarding this\n"))
    outer.attach(MIMEMessage(inner))                              # message/rfc822
    data = stored(outer)
    assert EICAR not in data
    return data


def sized(total: int, tail: bytes = b"") -> bytes:
    head = b"From: a@example.org\nSubject: big\nMessage-ID: <big@example.org>\n\n"
    line = b"a" * 75 + b"\n"
    body_len = total - len(head) - len(tail)
    body = (line * (body_len // len(line) + 1))[:body_len]
    data = head + body + tail
    assert len(data) == total
    return data


def scan_lines(events) -> list[str]:
    return [formatEvent(e) for e in events
            if str(e.get("log_namespace", "")).startswith("mailappliance.scan")]


class ClamdTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _daemon(self, clamd_daemon):
        self.daemon = clamd_daemon

    def scanning(self, **kw) -> Scanning:
        kw.setdefault("max_bytes", STREAM_MAX)
        timeout = kw.pop("timeout", 20)
        scanning = Scanning(reactor, virus=ClamdScanner(self.daemon.endpoint, reactor,
                                                        timeout=timeout), hostname="mx.test",
                            **kw)
        self.addCleanup(scanning.close)          # the connections it keeps between scans
        return scanning

    async def test_ping(self):
        self.assertIsNone(await ClamdScanner(self.daemon.endpoint, reactor).ping())

    async def test_eicar_in_the_body_an_attachment_and_a_nested_multipart_is_refused(self):
        scanning = self.scanning()
        for make in (eicar_in_body, eicar_attachment, eicar_nested):
            verdict = await scanning.check(make(), trusted=False, client_ip="192.0.2.1")
            self.assertIs(verdict.outcome, Outcome.REFUSE_VIRUS, make.__name__)
            self.assertIn(verdict.signature, EICAR_NAMES)

    async def test_trusted_mail_is_scanned_for_viruses_too(self):
        verdict = await self.scanning().check(eicar_attachment(), trusted=True)
        self.assertIs(verdict.outcome, Outcome.REFUSE_VIRUS)

    async def test_clean_mail_is_accepted_with_its_header(self):
        scanning = self.scanning()
        verdict = await scanning.check(clean_message(), trusted=False)
        self.assertIs(verdict.outcome, Outcome.ACCEPT)
        self.assertEqual(verdict.header_bytes(), b"X-Virus-Scanned: clean (clamd) on mx.test\n")
        # The connection is kept, and reads with a plain recv (clamd passes no descriptors).
        [kept] = scanning.virus._idle
        self.assertIs(kept.transport.doRead.__func__, tcp.Connection.doRead)
        # With clamd known up, a clean answer is one verdict made once.
        again = [await scanning.check(clean_message(), trusted=False) for _ in range(2)]
        self.assertEqual(again[0], verdict)
        self.assertIs(again[1], again[0])

    async def test_chunked_the_way_smtp_receives_it(self):
        data = eicar_attachment()
        chunks = [data[i:i + 7] for i in range(0, len(data), 7)]
        verdict = await self.scanning().check(chunks, trusted=False)
        self.assertIs(verdict.outcome, Outcome.REFUSE_VIRUS)

    async def test_a_message_at_the_size_limit_is_scanned_whole_and_one_byte_more_is_not_sent(self):
        scanning = self.scanning(max_bytes=STREAM_MAX)
        at_limit = sized(STREAM_MAX, tail=EICAR + b"\n")      # the virus in its last bytes
        verdict = await scanning.check(at_limit, trusted=False)
        self.assertIs(verdict.outcome, Outcome.REFUSE_VIRUS)
        with capturedLogs() as events:
            verdict = await scanning.check(sized(STREAM_MAX + 1, tail=EICAR + b"\n"),
                                           trusted=False)
        self.assertIs(verdict.outcome, Outcome.ACCEPT_UNSCANNED)
        self.assertIn(b"larger than the scan limit", verdict.header_bytes())
        self.assertEqual(scan_lines(events), [
            "scan: - message-id <big@example.org>: larger than max_bytes 1048576; not scanned"])

    async def test_clamd_stream_limit_below_max_bytes_tempfails_and_is_logged_per_message(self):
        scanning = self.scanning(max_bytes=2 * STREAM_MAX)
        await scanning.check(clean_message(), trusted=False)          # clamd is up
        with capturedLogs() as events:
            for _ in range(2):
                verdict = await scanning.check(sized(STREAM_MAX + 100_000), trusted=False)
                self.assertIs(verdict.outcome, Outcome.TEMPFAIL)
        logged = scan_lines(events)
        self.assertEqual(len(logged), 2)
        self.assertTrue(all("StreamMaxLength" in line for line in logged), logged)
        self.assertEqual((await scanning.check(clean_message(), trusted=False)).outcome,
                         Outcome.ACCEPT)

    async def test_many_scans_at_once(self):
        scanning = self.scanning()
        msgs = [clean_message() if i % 2 else eicar_in_body() for i in range(40)]
        verdicts = await defer.gatherResults([scanning.check(m, trusted=False) for m in msgs])
        self.assertEqual([v.outcome for v in verdicts],
                         [Outcome.ACCEPT if i % 2 else Outcome.REFUSE_VIRUS for i in range(40)])

    async def test_a_scanner_that_never_answers_tempfails_at_the_timeout_and_holds_up_nobody(self):
        silent = SilentServer()
        self.addCleanup(silent.close)
        hung = Scanning(reactor, virus=ClamdScanner(silent.endpoint, reactor, timeout=1.0))
        self.addCleanup(hung.close)
        started = time.monotonic()
        pending = hung.check(clean_message(), trusted=False)
        # Meanwhile another check against the real clamd completes.
        other = await self.scanning().check(eicar_in_body(), trusted=False)
        self.assertIs(other.outcome, Outcome.REFUSE_VIRUS)
        self.assertFalse(pending.called)
        verdict = await pending
        self.assertGreaterEqual(time.monotonic() - started, 1.0)
        self.assertIs(verdict.outcome, Outcome.TEMPFAIL)
        self.assertIn("no answer within 1 s", verdict.detail)
        self.assertGreater(silent.held, len(clean_message()))       # it got the whole stream


class _Upstream(Protocol):
    def __init__(self, down: "_HoldingProxy") -> None:
        self.down = down

    def dataReceived(self, data: bytes) -> None:
        self.down.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.down.transport.loseConnection()


class _HoldingProxy(Protocol):
    """Between our client and clamd: forwards everything, except that while `hold` is set it
    keeps back the end-of-stream marker and fires `held` -- clamd then has the whole message
    but no end, i.e. it is mid-scan, and the test can kill it right there."""

    def connectionMade(self) -> None:
        self.up = None
        self.pending: list[bytes] = []
        self.seen = b""
        self.transport.pauseProducing()
        d = connectProtocol(UNIXClientEndpoint(reactor, self.factory.target), _Upstream(self))
        d.addCallbacks(self._connected, lambda f: self.transport.loseConnection())

    def _connected(self, up) -> None:
        self.up = up
        for data in self.pending:
            self._forward(data)
        self.pending = []
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.up is None:
            self.pending.append(data)
        else:
            self._forward(data)

    def _forward(self, data: bytes) -> None:
        self.seen = (self.seen + data)[-4:]
        factory = self.factory
        if factory.hold and self.seen == END_OF_STREAM:
            self.up.transport.write(data[:-4])
            factory.hold = False
            factory.held.callback(None)
            return
        self.up.transport.write(data)

    def connectionLost(self, reason) -> None:
        if self.up is not None:
            self.up.transport.loseConnection()


class ClamdRestartTests(unittest.TestCase):
    """A clamd of its own, killed with SIGKILL in the middle of a scan and started again."""

    @pytest.fixture(autouse=True)
    def _dirs(self, tmp_path):
        self.tmp = tmp_path

    async def test_killed_mid_scan_tempfails_logs_once_and_recovers_without_a_restart(self):
        daemon = ClamdDaemon(self.tmp / "clamd").start()
        self.addCleanup(daemon.cleanup)
        factory = Factory.forProtocol(_HoldingProxy)
        factory.target = str(daemon.socket)
        factory.hold = False
        proxy_path = daemon.sockdir / "proxy.sock"
        port = reactor.listenUNIX(str(proxy_path), factory)
        self.addCleanup(port.stopListening)
        timeout = 20.0
        scanning = Scanning(reactor, virus=ClamdScanner(f"unix:{proxy_path}", reactor,
                                                        timeout=timeout))
        self.addCleanup(scanning.close)
        with capturedLogs() as events:
            self.assertIs((await scanning.check(clean_message(), trusted=False)).outcome,
                          Outcome.ACCEPT)
            factory.hold, factory.held = True, defer.Deferred()
            pending = scanning.check(eicar_attachment(), trusted=False)
            await factory.held                         # clamd has the message, not its end
            daemon.kill()
            verdict = await pending
            self.assertIs(verdict.outcome, Outcome.TEMPFAIL)
            self.assertIn("closed the connection", verdict.detail)     # not the timeout
            for _ in range(3):
                verdict = await scanning.check(clean_message(), trusted=False)
                self.assertIs(verdict.outcome, Outcome.TEMPFAIL)
            daemon.start()                              # same socket, same Scanning object
            self.assertIs((await scanning.check(eicar_attachment(), trusted=False)).outcome,
                          Outcome.REFUSE_VIRUS)
            self.assertIs((await scanning.check(clean_message(), trusted=False)).outcome,
                          Outcome.ACCEPT)
        logged = scan_lines(events)
        self.assertEqual(logged[0], "scan: clamd available")
        self.assertTrue(logged[1].startswith("scan: clamd unavailable: clamd closed the"
                                             " connection"), logged)
        self.assertRegex(logged[2], r"^scan: clamd available again after \d+ s; 4 messages"
                                    r" tempfailed meanwhile$")
        self.assertTrue(logged[3].startswith("scan: - message-id <attachment@example.org>:"
                                             " virus"), logged)
        self.assertEqual(len(logged), 4, logged)


    async def test_a_clamd_restart_between_scans_costs_no_message(self):
        """The connections kept between scans die with clamd. Restarted while the reactor
        is busy (stop and start block it), the next scan still finds a dead one in the idle
        list: that one is retried on a new connection, and nothing is tempfailed or logged."""
        daemon = ClamdDaemon(self.tmp / "clamd").start()
        self.addCleanup(daemon.cleanup)
        scanning = Scanning(reactor, virus=ClamdScanner(daemon.endpoint, reactor, timeout=20))
        self.addCleanup(scanning.close)
        with capturedLogs() as events:
            first = await defer.gatherResults(
                [scanning.check(clean_message(), trusted=False) for _ in range(4)])
            self.assertEqual({v.outcome for v in first}, {Outcome.ACCEPT})
            self.assertEqual(len(scanning.virus._idle), 4)      # kept for the next scans
            daemon.stop()
            daemon.start()
            for make in (clean_message, eicar_in_body, clean_message, eicar_attachment):
                verdict = await scanning.check(make(), trusted=False)
                self.assertIs(verdict.outcome, Outcome.ACCEPT if make is clean_message
                              else Outcome.REFUSE_VIRUS, make.__name__)
        logged = scan_lines(events)
        self.assertEqual(logged[0], "scan: clamd available")
        self.assertFalse([line for line in logged if "unavailable" in line], logged)


class RspamdTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _daemon(self, rspamd_daemon):
        self.daemon = rspamd_daemon

    def scanning(self) -> Scanning:
        return Scanning(reactor, spam=RspamdScorer(self.daemon.endpoint, reactor, timeout=20),
                        hostname="mx.test")

    async def test_ping(self):
        self.assertIsNone(await RspamdScorer(self.daemon.endpoint, reactor).ping())

    async def test_spam_rule_hit_is_refused(self):
        msg = b"From: a@example.org\nSubject: offer\nMessage-ID: <spam@x>\n\nbuy " + \
            SPAM_TOKEN + b" now\n"
        verdict = await self.scanning().check(msg, trusted=False, client_ip="192.0.2.5",
                                              helo="spammer.example", sender="a@example.org",
                                              recipients=["b@test.com"])
        self.assertIs(verdict.outcome, Outcome.REFUSE_SPAM)
        self.assertEqual(verdict.score, 20.0)

    async def test_suspect_mail_is_tagged_not_refused(self):
        msg = b"From: a@example.org\nSubject: hm\n\nthis is " + SUSPECT_TOKEN + b"\n"
        verdict = await self.scanning().check(msg, trusted=False)
        self.assertIs(verdict.outcome, Outcome.ACCEPT)
        headers = dict(verdict.headers)
        self.assertEqual(headers["X-Spam-Flag"], "YES")
        self.assertEqual(headers["X-Spam-Score"], "8.0")
        self.assertIn("tests=MAILAPPLIANCE_TEST_SUSPECT", headers["X-Spam-Status"])

    async def test_clean_mail_gets_a_no(self):
        verdict = await self.scanning().check(clean_message(), trusted=False)
        self.assertIs(verdict.outcome, Outcome.ACCEPT)
        self.assertTrue(dict(verdict.headers)["X-Spam-Status"].startswith("No, score=0.0"))

    async def test_trusted_mail_is_not_scored(self):
        msg = b"Subject: from a user\n\n" + SPAM_TOKEN + b"\n"
        verdict = await self.scanning().check(msg, trusted=True, user="bob@test.com")
        self.assertIs(verdict.outcome, Outcome.ACCEPT)
        self.assertEqual(verdict.headers, ())

    async def test_a_big_message_is_scored(self):
        msg = sized(3 * 1024 * 1024, tail=SPAM_TOKEN + b"\n")
        verdict = await self.scanning().check(msg, trusted=False)
        self.assertIs(verdict.outcome, Outcome.REFUSE_SPAM)
