"""Scanning (mailappliance/scan/policy.py) with the verified fakes and a Clock: outcomes,
max_bytes, trusted clients, deadlines, and outages logged once each."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from mailappliance.scan.interfaces import ISpamScorer, IVirusScanner, ScanFailure
from mailappliance.scan.policy import Scanning
from mailappliance.scan.verdict import Outcome, SpamThresholds
from mailappliance.testing.scanners import (
    EICAR, SPAM_TOKEN, FakeSpamScorer, FakeVirusScanner)

import pytest

CLEAN_MSG = b"From: a@example.org\nMessage-ID: <m1@example.org>\nSubject: hi\n\nhello\n"
VIRUS_MSG = b"Message-ID: <v1@example.org>\n\n" + EICAR + b"\n"
SPAM_MSG = b"Message-ID: <s1@example.org>\n\nbuy " + SPAM_TOKEN + b"\n"


def make(on_error="tempfail", max_bytes=10_000, spam=True, virus=True, timeout=30.0):
    clock = Clock()
    v = FakeVirusScanner(clock=clock, timeout=timeout) if virus else None
    s = FakeSpamScorer(clock=clock, timeout=timeout) if spam else None
    scanning = Scanning(clock, virus=v, spam=s, on_error=on_error, max_bytes=max_bytes,
                        hostname="mx.test")
    return scanning, v, s, clock


def check(scanning, msg, trusted=False, **kw):
    kw.setdefault("client_ip", "192.0.2.9")
    return scanning.check(msg, trusted=trusted, **kw)


def lines(events):
    return [formatEvent(e) for e in events
            if str(e.get("log_namespace", "")).startswith("mailappliance.scan")]


def test_fakes_provide_the_interfaces():
    assert verifyObject(IVirusScanner, FakeVirusScanner())
    assert verifyObject(ISpamScorer, FakeSpamScorer())


def test_clean_message_is_accepted_with_headers_from_both():
    scanning, v, s, _ = make()
    d = check(scanning, [CLEAN_MSG[:10], CLEAN_MSG[10:]], helo="h.example",
              sender="a@example.org", recipients=["b@test.com"])
    verdict = d.result
    assert verdict.outcome is Outcome.ACCEPT
    assert verdict.header_bytes().startswith(b"X-Virus-Scanned: clean (clamd) on mx.test\n")
    assert b"X-Spam-Status: No, score=0.0" in verdict.header_bytes()
    assert v.calls == [CLEAN_MSG] and s.calls == [CLEAN_MSG]
    env = s.envelopes[0]
    assert (env.client_ip, env.helo, env.sender, env.recipients, env.hostname) == \
        ("192.0.2.9", "h.example", "a@example.org", ("b@test.com",), "mx.test")


def test_virus_is_refused_and_logged_with_ip_and_message_id():
    scanning, _, _, _ = make()
    with capturedLogs() as events:
        verdict = check(scanning, VIRUS_MSG).result
    assert verdict.outcome is Outcome.REFUSE_VIRUS
    assert verdict.signature == "Eicar-Test-Signature"
    assert lines(events) == ["scan: clamd available", "scan: rspamd available",
                             "scan: 192.0.2.9 message-id <v1@example.org>: virus"
                             " Eicar-Test-Signature found by clamd; refused"]


def test_spam_is_refused_and_logged():
    scanning, _, _, _ = make()
    with capturedLogs() as events:
        verdict = check(scanning, SPAM_MSG).result
    assert verdict.outcome is Outcome.REFUSE_SPAM and verdict.score == 20.0
    assert "spam score 20.0 >= 15.0 (rspamd: MAILAPPLIANCE_TEST_SPAM); refused" in \
        lines(events)[-1]


def test_trusted_mail_is_scanned_for_viruses_but_not_scored():
    scanning, v, s, _ = make()
    verdict = check(scanning, SPAM_MSG, trusted=True, user="bob@test.com").result
    assert verdict.outcome is Outcome.ACCEPT
    assert s.calls == [] and len(v.calls) == 1
    assert not any(name.startswith("X-Spam") for name, _ in verdict.headers)
    assert check(scanning, VIRUS_MSG, trusted=True).result.outcome is Outcome.REFUSE_VIRUS
    only_spam, _, s2, _ = make(virus=False)
    assert check(only_spam, SPAM_MSG, trusted=True).result.outcome is Outcome.ACCEPT
    assert s2.calls == []


def test_thresholds_are_configurable():
    clock = Clock()
    scanning = Scanning(clock, spam=FakeSpamScorer({b"meh": ("MEH", 4.0)}),
                        thresholds=SpamThresholds(tag=2.0, reject=4.0))
    assert check(scanning, b"\nmeh\n").result.outcome is Outcome.REFUSE_SPAM
    assert check(scanning, b"\nfine\n").result.outcome is Outcome.ACCEPT


def test_message_over_max_bytes_is_sent_to_no_scanner_and_logged():
    scanning, v, s, _ = make(max_bytes=100)
    at_limit = VIRUS_MSG + b"x" * (100 - len(VIRUS_MSG))
    assert len(at_limit) == 100
    assert check(scanning, at_limit).result.outcome is Outcome.REFUSE_VIRUS
    with capturedLogs() as events:
        verdict = check(scanning, at_limit + b"y").result
    assert verdict.outcome is Outcome.ACCEPT_UNSCANNED
    assert b"NOT SCANNED" in verdict.header_bytes()
    assert len(v.calls) == 1 and len(s.calls) == 1                   # only the first one
    assert lines(events) == ["scan: 192.0.2.9 message-id <v1@example.org>: larger than"
                             " max_bytes 100; not scanned"]


def test_hanging_scanner_tempfails_at_the_timeout_not_before():
    scanning, v, _, clock = make(timeout=30)
    v.mode = "hang"
    d = check(scanning, CLEAN_MSG)
    clock.advance(29.9)
    assert not d.called
    clock.advance(0.1)
    assert d.result.outcome is Outcome.TEMPFAIL
    assert "no answer within 30 s" in d.result.detail


def test_other_checks_are_not_held_up_by_a_hanging_one():
    clock = Clock()
    hanging = FakeVirusScanner(clock=clock)
    hanging.mode = "hang"
    slow = Scanning(clock, virus=hanging)
    fast = Scanning(clock, virus=FakeVirusScanner(clock=clock))
    pending = check(slow, CLEAN_MSG)
    assert check(fast, CLEAN_MSG).result.outcome is Outcome.ACCEPT
    assert not pending.called


def test_on_error_accept_lets_mail_through_marked_unscanned():
    scanning, v, s, _ = make(on_error="accept")
    v.mode = "down"
    verdict = check(scanning, CLEAN_MSG).result
    assert verdict.outcome is Outcome.ACCEPT_UNSCANNED
    assert verdict.header_bytes().startswith(b"X-Virus-Scanned: NOT SCANNED on mx.test: clamd"
                                             b" unavailable: cannot connect")
    s.mode = "down"
    v.mode = "up"
    verdict = check(scanning, CLEAN_MSG).result
    assert b"X-Spam-Status: NOT SCORED" in verdict.header_bytes()
    assert check(scanning, VIRUS_MSG).result.outcome is Outcome.REFUSE_VIRUS


def test_outage_and_recovery_are_logged_once_each():
    scanning, v, _, clock = make()
    with capturedLogs() as events:
        assert check(scanning, CLEAN_MSG).result.outcome is Outcome.ACCEPT
        v.mode = "down"
        clock.advance(100)
        for _ in range(5):
            assert check(scanning, CLEAN_MSG).result.outcome is Outcome.TEMPFAIL
        clock.advance(42)
        v.mode = "up"
        for _ in range(3):
            assert check(scanning, CLEAN_MSG).result.outcome is Outcome.ACCEPT
    assert lines(events) == [
        "scan: clamd available",
        "scan: rspamd available",
        "scan: clamd unavailable: cannot connect to clamd: Connection refused; mail gets 451"
        " until it is back",
        "scan: clamd available again after 42 s; 5 messages tempfailed meanwhile",
    ]


def test_a_per_message_limit_is_logged_per_message_and_is_not_an_outage():
    scanning, v, _, _ = make()
    check(scanning, CLEAN_MSG)
    v.mode = "limit"
    with capturedLogs() as events:
        for _ in range(2):
            assert check(scanning, CLEAN_MSG).result.outcome is Outcome.TEMPFAIL
    logged = lines(events)
    assert len(logged) == 2 and all("StreamMaxLength" in line for line in logged)
    assert all("<m1@example.org>" in line for line in logged)
    v.mode = "up"
    with capturedLogs() as events:
        check(scanning, CLEAN_MSG)
    assert lines(events) == []                          # no "available again": never down


def test_start_pings_and_logs_what_answers():
    scanning, v, s, _ = make()
    s.mode = "down"
    with capturedLogs() as events:
        d = scanning.start()
    assert d.called
    assert v.pings == 1 and s.pings == 1
    assert lines(events) == ["scan: clamd available",
                             "scan: rspamd unavailable: cannot connect to rspamd: Connection"
                             " refused; mail gets 451 until it is back"]
    s.mode = "up"
    with capturedLogs() as events:
        check(scanning, CLEAN_MSG)
    assert lines(events) == ["scan: rspamd available again after 0 s; 0 messages tempfailed"
                             " meanwhile"]


def test_cancelling_a_check_cancels_the_scans():
    scanning, v, s, clock = make()
    v.mode = s.mode = "hang"
    d = check(scanning, CLEAN_MSG)
    d.cancel()
    assert d.result.check(CancelledError)
    d.addErrback(lambda f: None)
    assert clock.getDelayedCalls() == []                # both fakes' timers are gone


def test_cancelling_a_virus_only_check_cancels_its_scan():
    """clamd alone (or a trusted client): the scan's own Deferred carries the verdict, and
    cancelling the check cancels the scan."""
    for spam, trusted in ((False, False), (True, True)):
        scanning, v, s, clock = make(spam=spam)
        v.mode = "hang"
        d = check(scanning, CLEAN_MSG, trusted=trusted)
        assert not d.called and len(v.calls) == 1
        d.cancel()
        assert d.result.check(CancelledError)
        d.addErrback(lambda f: None)
        assert clock.getDelayedCalls() == []
        assert scanning.counts == {}                      # no verdict was made


def test_the_clean_verdict_of_a_virus_only_check_is_made_once():
    scanning, v, _, _ = make(spam=False)
    scanning.start()                                      # clamd answers its PING: known up
    first, second = (check(scanning, CLEAN_MSG).result for _ in range(2))
    assert first is second and first.outcome is Outcome.ACCEPT
    assert first.header_bytes() == b"X-Virus-Scanned: clean (clamd) on mx.test\n"
    assert check(scanning, VIRUS_MSG).result.outcome is Outcome.REFUSE_VIRUS
    assert scanning.counts == {"accept": 2, "refuse-virus": 1}


def test_a_scanner_that_raises_is_a_failure_not_a_crash():
    class Broken(FakeVirusScanner):
        def scan(self, message):
            raise RuntimeError("boom")

    class Failing(FakeSpamScorer):
        def score(self, message, envelope):
            return defer.fail(RuntimeError("bang"))

    scanning = Scanning(Clock(), virus=Broken(), spam=Failing())
    verdict = check(scanning, CLEAN_MSG).result
    assert verdict.outcome is Outcome.TEMPFAIL
    assert "clamd client error: boom" in verdict.detail
    assert "rspamd client error: bang" in verdict.detail


def test_nothing_configured_accepts_without_headers():
    verdict = Scanning(Clock()).check(CLEAN_MSG, trusted=False).result
    assert verdict.outcome is Outcome.ACCEPT and verdict.headers == ()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Scanning(Clock(), on_error="bounce")


def test_failure_type_is_shared():
    assert ScanFailure("x") == ScanFailure("x", outage=True)


def test_build_from_settings():
    from types import SimpleNamespace

    from twisted.internet.testing import MemoryReactorClock

    from mailappliance.scan.policy import build_scanning
    reactor = MemoryReactorClock()
    keys = dict(clamd="", spam="", on_error="tempfail", timeout=30, max_bytes=1000)
    assert build_scanning(SimpleNamespace(**keys), "mx.test", reactor) is None
    s = build_scanning(SimpleNamespace(**{**keys, "clamd": "/run/clamav/clamd.ctl",
                                          "spam": "rspamd:tcp:127.0.0.1:11333",
                                          "spam_reject_score": 9.5}), "mx.test", reactor)
    assert (s.virus.name, s.spam.name, s.virus.timeout, s.max_bytes) == \
        ("clamd", "rspamd", 30.0, 1000)
    assert s.thresholds == SpamThresholds(tag=6.0, reject=9.5)
    with pytest.raises(ValueError):
        build_scanning(SimpleNamespace(**{**keys, "spam": "spamd:/run/spamd.sock"}), "h",
                       reactor)
    with pytest.raises(ValueError):
        build_scanning(SimpleNamespace(**{**keys, "clamd": "/x", "on_error": "drop"}), "h",
                       reactor)
    with pytest.raises(ValueError):
        build_scanning(SimpleNamespace(**{**keys, "clamd": "bogus:endpoint"}), "h", reactor)
