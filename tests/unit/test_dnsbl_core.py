"""The pure DNSBL core: names, reason text, RBLSMTPD, per-zone classification, the verdict."""

from __future__ import annotations

import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, strategies as st

from mailappliance.access.dnsbl import (
    FAIL_CLOSED_TEXT, MAX_REASON, Refusal, Status, ZoneResult, classify, env_decision,
    query_prefix, reason_text, sanitize, verdict)
from mailappliance.dns import Answer, DNSTemporaryError


@pytest.mark.parametrize("ip, prefix", [
    ("127.0.0.2", "2.0.0.127"),
    ("192.0.2.99", "99.2.0.192"),
    ("::ffff:192.0.2.99", "99.2.0.192"),                     # IPv4-mapped: looked up as IPv4
    ("2001:db8:1:2::abcd",                                    # RFC 5782 section 2.4 nibbles
     "d.c.b.a.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"),
    ("[::1]", "1." + "0." * 30 + "0"),
])
def test_query_prefix(ip, prefix):
    assert query_prefix(ip) == prefix


@pytest.mark.parametrize("not_ip", ["", "unix", "/var/run/x.sock", "1.2.3", "example.com"])
def test_query_prefix_of_a_non_address_is_none(not_ip):
    assert query_prefix(not_ip) is None


def test_ipv6_prefix_has_32_nibbles():
    assert len(query_prefix("2001:db8::1").split(".")) == 32


def test_sanitize_cuts_to_200_and_replaces_non_printables():
    assert len(sanitize("x" * 500)) == MAX_REASON == 200
    assert sanitize("a\r\nb\tc\x00d\x7fé") == "a??b?c?d??"


@given(st.text(max_size=1000))
def test_sanitized_text_is_always_safe_for_one_smtp_line(text):
    out = sanitize(text)
    assert len(out) <= 200 and all(" " <= c <= "~" for c in out)


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"RELAYCLIENT": ""}, False),                      # relay clients are still checked
    ({"RBLSMTPD": ""}, None),                          # empty: skip the lists
    ({"RBLSMTPD": "go away"}, Refusal(False, "go away")),
    ({"RBLSMTPD": "-go away for good"}, Refusal(True, "go away for good")),
    ({"RBLSMTPD": "-"}, Refusal(True, "")),
])
def test_rblsmtpd_environment(env, expected):
    assert env_decision(env) == expected


def test_rblsmtpd_text_is_sanitized_like_a_txt_reason():
    refusal = env_decision({"RBLSMTPD": "bad\r\nRCPT TO:<x>" + "y" * 300})
    assert "\r" not in refusal.text and "\n" not in refusal.text and len(refusal.text) == 200


def test_refusal_codes():
    assert Refusal(False, "x").code == 451 and Refusal(True, "x").code == 553


def _a(*addrs, rcode=dns.rcode.NOERROR):
    recs = tuple(dns.rrset.from_text("n.", 60, "IN", "A", a)[0] for a in addrs)
    return Answer("n", dns.rdatatype.A, rcode, recs, 60, "n")


def test_classify():
    assert classify("bl.test", _a("127.0.0.2")).status is Status.LISTED
    assert classify("bl.test", _a(rcode=dns.rcode.NXDOMAIN)).status is Status.CLEAR
    assert classify("bl.test", _a()).status is Status.CLEAR                      # NODATA
    err = classify("bl.test", DNSTemporaryError("n", "SERVFAIL"))
    assert err.status is Status.ERROR and err.detail == "SERVFAIL"


def test_an_answer_outside_127_8_is_a_broken_list_not_a_listing():
    r = classify("bl.test", _a("198.51.100.7"))
    assert r.status is Status.ERROR and "RFC 5782" in r.detail


def test_reason_text_from_txt_or_default():
    txt = Answer("n", dns.rdatatype.TXT, dns.rcode.NOERROR,
                 (dns.rrset.from_text("n.", 60, "IN", "TXT", '"spam\\010source"')[0],), 60, "n")
    assert reason_text("192.0.2.1", "bl.test", txt) == "spam?source"
    default = reason_text("192.0.2.1", "bl.test", DNSTemporaryError("n", "timeout"))
    assert default == "client 192.0.2.1 is listed in bl.test"
    assert reason_text("192.0.2.1", "bl.test", None) == default


L, C, E = Status.LISTED, Status.CLEAR, Status.ERROR


def _results(*pairs):
    return [ZoneResult(z, s, f"reason {z}" if s is L else ("SERVFAIL" if s is E else ""))
            for z, s in pairs]


@pytest.mark.parametrize("allow, block, permanent, fail_closed, expected, zone", [
    ([], [("a", C), ("b", C)], False, False, None, None),
    ([], [("a", C), ("b", L)], False, False, Refusal(False, "reason b"), "b"),
    ([], [("a", L), ("b", L)], True, False, Refusal(True, "reason a"), "a"),   # config order
    ([("ok", L)], [("a", L)], False, False, None, "ok"),                    # allowlist wins
    ([("ok", C)], [("a", L)], False, False, Refusal(False, "reason a"), "a"),
    ([("ok", E)], [("a", L)], False, False, Refusal(False, "reason a"), "a"),
    ([], [("a", E), ("b", C)], False, False, None, None),                    # fail open
    ([], [("a", E), ("b", C)], True, True, Refusal(False, FAIL_CLOSED_TEXT), "a"),  # 451 only
    ([], [("a", E), ("b", L)], False, True, Refusal(False, "reason b"), "b"),
    ([("ok", L)], [("a", E)], False, True, None, "ok"),
])
def test_verdict_table(allow, block, permanent, fail_closed, expected, zone):
    v = verdict(_results(*allow), _results(*block), permanent=permanent,
                fail_closed=fail_closed)
    assert v.refusal == expected and v.zone == zone


def test_verdict_reports_every_lookup_error():
    v = verdict(_results(("ok", E)), _results(("a", E), ("b", C)), permanent=False,
                fail_closed=False)
    assert [e.zone for e in v.errors] == ["ok", "a"]
