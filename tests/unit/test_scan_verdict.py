"""The scanning decision, its headers, Message-ID for the log, scanner health, and the SMTP
replies a verdict maps to (mailappliance/scan/verdict.py, scan/service.py). Pure: no sockets,
no clock."""

from __future__ import annotations

import pytest

from mailappliance.scan.interfaces import ScanFailure, SpamReport, VirusReport
from mailappliance.scan.verdict import (
    Health, Outcome, SpamThresholds, State, decide, message_id, oversized, spam_headers)
from mailappliance.scan.service import scan_reply

T = SpamThresholds()                       # tag 6, reject 15
CLEAN = VirusReport(None)
VIRUS = VirusReport("Eicar-Test-Signature")
DOWN = ScanFailure("cannot connect to clamd: Connection refused")
HAM = SpamReport(1.0)
TAGGED = SpamReport(8.0, ("A", "B"))
SPAM = SpamReport(20.0, ("MAILAPPLIANCE_TEST_SPAM",))

# (virus, spam, on_error) -> outcome; None = that scanner was not asked
TABLE = [
    (CLEAN, HAM, "tempfail", Outcome.ACCEPT),
    (CLEAN, None, "tempfail", Outcome.ACCEPT),                     # trusted: not scored
    (None, HAM, "tempfail", Outcome.ACCEPT),                       # no clamd configured
    (CLEAN, TAGGED, "tempfail", Outcome.ACCEPT),                   # tagged, not refused
    (VIRUS, HAM, "tempfail", Outcome.REFUSE_VIRUS),
    (VIRUS, SPAM, "tempfail", Outcome.REFUSE_VIRUS),               # the virus is named
    (VIRUS, DOWN, "tempfail", Outcome.REFUSE_VIRUS),               # definite beats failure
    (CLEAN, SPAM, "tempfail", Outcome.REFUSE_SPAM),
    (DOWN, SPAM, "tempfail", Outcome.REFUSE_SPAM),
    (DOWN, HAM, "tempfail", Outcome.TEMPFAIL),
    (CLEAN, DOWN, "tempfail", Outcome.TEMPFAIL),
    (DOWN, None, "tempfail", Outcome.TEMPFAIL),
    (DOWN, HAM, "accept", Outcome.ACCEPT_UNSCANNED),
    (CLEAN, DOWN, "accept", Outcome.ACCEPT_UNSCANNED),
    (DOWN, DOWN, "accept", Outcome.ACCEPT_UNSCANNED),
    (VIRUS, HAM, "accept", Outcome.REFUSE_VIRUS),
    (None, None, "tempfail", Outcome.ACCEPT),
]


@pytest.mark.parametrize("virus,spam,on_error,outcome", TABLE)
def test_decision_table(virus, spam, on_error, outcome):
    v = decide(virus, spam, on_error=on_error, thresholds=T, hostname="mx.test")
    assert v.outcome is outcome
    assert v.accepted == (outcome in (Outcome.ACCEPT, Outcome.ACCEPT_UNSCANNED))
    if not v.accepted:
        assert v.headers == ()


def test_reject_threshold_is_inclusive():
    assert decide(CLEAN, SpamReport(15.0), on_error="tempfail", thresholds=T,
                  hostname="h").outcome is Outcome.REFUSE_SPAM
    assert decide(CLEAN, SpamReport(14.9), on_error="tempfail", thresholds=T,
                  hostname="h").outcome is Outcome.ACCEPT
    custom = SpamThresholds(tag=3.0, reject=5.0)
    assert decide(CLEAN, SpamReport(5.0), on_error="tempfail", thresholds=custom,
                  hostname="h").outcome is Outcome.REFUSE_SPAM


def test_clean_headers():
    v = decide(CLEAN, HAM, on_error="tempfail", thresholds=T, hostname="mx.test")
    assert v.header_bytes() == (
        b"X-Virus-Scanned: clean (clamd) on mx.test\n"
        b"X-Spam-Score: 1.0\n"
        b"X-Spam-Level: *\n"
        b"X-Spam-Status: No, score=1.0 tag=6.0 reject=15.0 scorer=rspamd\n")


def test_tagged_headers_flag_and_fold_the_rule_names():
    names = tuple(f"RULE_NUMBER_{i:02d}" for i in range(12))
    hs = dict(spam_headers(SpamReport(8.4, names), T, "rspamd"))
    assert hs["X-Spam-Flag"] == "YES"
    assert hs["X-Spam-Level"] == "********"
    status = hs["X-Spam-Status"]
    assert status.startswith("Yes, score=8.4 ")
    lines = status.split("\n")
    assert all(line.startswith("\t") for line in lines[1:])          # folded (RFC 5322 2.2.3)
    assert all(len(line) <= 78 for line in lines)
    assert ",".join(names) == "".join(line.strip() for line in lines[1:])[len("tests="):]


def test_stars_are_capped_and_never_negative():
    assert dict(spam_headers(SpamReport(500.0), T, "r"))["X-Spam-Level"] == "*" * 50
    assert dict(spam_headers(SpamReport(-3.0), T, "r"))["X-Spam-Level"] == ""


def test_unscanned_headers_say_which_scanner_and_why_in_one_line():
    v = decide(ScanFailure("no answer\r\nwithin 30 s"), ScanFailure("refused"),
               on_error="accept", thresholds=T, hostname="mx.test")
    text = v.header_bytes()
    assert text.count(b"\n") == 2 and b"\r" not in text
    assert text.startswith(b"X-Virus-Scanned: NOT SCANNED on mx.test: clamd unavailable: no answer")
    assert b"X-Spam-Status: NOT SCORED on mx.test: rspamd unavailable: refused" in text
    assert "clamd unavailable" in v.detail and "rspamd unavailable" in v.detail


def test_oversized_is_accepted_unscanned_with_a_header():
    v = oversized(1000, "mx.test")
    assert v.outcome is Outcome.ACCEPT_UNSCANNED
    assert v.header_bytes() == (b"X-Virus-Scanned: NOT SCANNED on mx.test: message larger"
                                b" than the scan limit of 1000 bytes\n")


def test_settings_are_checked():
    with pytest.raises(ValueError):
        decide(CLEAN, HAM, on_error="drop", thresholds=T, hostname="h")
    with pytest.raises(ValueError):
        SpamThresholds(reject=float("inf"))


def test_replies_for_each_outcome():
    v = decide(VIRUS, None, on_error="tempfail", thresholds=T, hostname="h")
    r = scan_reply(v)
    assert (r.code, r.enhanced) == (554, "5.7.0") and "Eicar-Test-Signature" in r.text
    r = scan_reply(decide(CLEAN, SPAM, on_error="tempfail", thresholds=T, hostname="h"))
    assert (r.code, r.enhanced) == (550, "5.7.1") and "score 20.0, limit 15.0" in r.text
    r = scan_reply(decide(DOWN, None, on_error="tempfail", thresholds=T, hostname="h"))
    assert (r.code, r.enhanced) == (451, "4.3.0")
    assert scan_reply(decide(CLEAN, HAM, on_error="tempfail", thresholds=T, hostname="h")) is None
    assert scan_reply(decide(DOWN, HAM, on_error="accept", thresholds=T, hostname="h")) is None
    assert scan_reply(oversized(1, "h")) is None
    assert scan_reply(v).render(True).startswith(b"554 5.7.0 sorry")


def test_message_id_for_the_log():
    assert message_id([b"Subject: x\nMessage-ID: <abc@example.org>\n\nbody\n"]) == \
        "<abc@example.org>"
    assert message_id([b"message-id:\n <folded@x>\nSubject: y\n\n"]) == "<folded@x>"
    assert message_id([b"Subject: x\nMess", b"age-Id: <split@x>\n\n"]) == "<split@x>"
    assert message_id([b"Subject: x\n\nMessage-ID: <in-body@x>\n"]) is None
    assert message_id([b"\nMessage-ID: <x>\n"]) is None
    assert message_id([b"Subject: x\n" * 10000 + b"Message-ID: <late@x>\n\n"]) is None
    assert message_id([b"Message-ID: <" + b"a" * 500 + b"\x01>\n\n"]) == "<" + "a" * 199


def test_health_logs_outage_and_recovery_once_each():
    h = Health("clamd")
    assert h.state is State.UNKNOWN
    first = h.success(0.0)
    assert first.state is State.UP and first.first
    assert h.success(1.0) is None
    down = h.failure(10.0, "Connection refused")
    assert down.state is State.DOWN and down.detail == "Connection refused"
    assert [h.failure(10.0 + i, "Connection refused") for i in range(5)] == [None] * 5
    up = h.success(52.0)
    assert (up.state, up.down_for, up.affected, up.first) == (State.UP, 42.0, 6, False)
    assert h.success(53.0) is None
    again = h.failure(60.0, "timeout")
    assert again is not None and again.state is State.DOWN
    assert h.success(61.0).affected == 1


def test_health_down_at_start_up_then_recovering():
    h = Health("rspamd")
    assert h.failure(0.0, "refused", message=False).state is State.DOWN
    up = h.success(5.0)
    assert up.affected == 0 and up.down_for == 5.0 and not up.first
