"""Authentication-Results (RFC 8601): what we write parses with an independent reader (authres);
forged fields claiming our authserv-id go, others stay; the verdict's actions and replies."""

from __future__ import annotations

import authres
import pytest

from mailappliance.mailauth import results
from mailappliance.mailauth.dkimverify import DKIMResult
from mailappliance.mailauth.dmarc import DMARCResult
from mailappliance.mailauth.spf import SPFResult

SPF_PASS = SPFResult("pass", "mailfrom", "example.com", "a@example.com", "ip4:1.2.3.4 in x")
DKIM_PASS = DKIMResult("pass", "example.com", "mail", "rsa-sha256", "AbC+/12=")
DMARC_FAIL = DMARCResult("fail", "example.com", "reject", "reject", "no aligned pass")


def test_header_parses_with_authres_and_carries_each_method():
    raw = results.authentication_results("mx.test.com", SPF_PASS, [DKIM_PASS], DMARC_FAIL)
    assert raw.endswith(b"\r\n") and raw.startswith(b"Authentication-Results: mx.test.com;")
    text = raw.decode().replace("\r\n", "")
    parsed = authres.AuthenticationResultsHeader.parse(text)
    assert parsed.authserv_id == "mx.test.com"
    methods = {r.method: r for r in parsed.results}
    assert methods["spf"].result == "pass"
    assert methods["dkim"].result == "pass"
    assert methods["dmarc"].result == "fail"
    assert {p.name: p.value for p in methods["dkim"].properties}["d"] == "example.com"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_no_signature_and_helo_identity():
    spf = SPFResult("none", "helo", "client.example", "postmaster@client.example")
    raw = results.authentication_results("mx", spf, [], None, b"\n").decode()
    assert "spf=none smtp.helo=client.example" in raw and "dkim=none" in raw
    assert raw.endswith("\n") and "\r" not in raw


def test_comments_cannot_break_out():
    spf = SPFResult("temperror", "mailfrom", "x.com", "a@x.com", "DNS error (evil); dkim=pass\r\n")
    raw = results.authentication_results("mx", spf, None, None).decode()
    assert raw.count("(") == 1 and raw.count(")") == 1
    assert all(line.startswith("\t") for line in raw[:-2].split("\r\n")[1:])


@pytest.mark.parametrize("field, ours", [
    (b"Authentication-Results: mx.test.com; spf=pass\r\n", True),
    (b"Authentication-Results: MX.Test.Com.; dkim=pass\r\n", True),
    (b"Authentication-Results: (forged) \"mx.test.com\" 1;\r\n\tdmarc=pass\r\n", True),
    (b"authentication-results:mx.test.com;none\r\n", True),
    (b"Authentication-Results: (nested (comment)) mx.test.com; none\r\n", True),
    (b"Authentication-Results: other.example; spf=pass\r\n", False),
    (b"Authentication-Results: mx.test.com.evil; spf=pass\r\n", False),
    (b"X-Authentication-Results: mx.test.com; spf=pass\r\n", False),
])
def test_strip_forged(field, ours):
    message = b"Received: x\r\n" + field + b"Subject: s\r\n\r\nAuthentication-Results: " \
        b"mx.test.com; body text\r\n"
    cleaned, removed = results.strip_forged(message, "mx.test.com")
    assert removed == (1 if ours else 0)
    assert (field in cleaned) is not ours
    assert cleaned.endswith(b"\r\n\r\nAuthentication-Results: mx.test.com; body text\r\n")


def test_verdict_reject_quarantine_accept():
    v = results.decide("mx", SPF_PASS, [DKIM_PASS], DMARC_FAIL, "enforce")
    assert v.action == "reject"
    assert (v.reply.code, v.reply.enhanced) == (550, "5.7.1") and "DMARC" in v.reply.text
    quarantine = DMARCResult("fail", "example.com", "quarantine", "quarantine")
    v = results.decide("mx", SPF_PASS, [], quarantine, "enforce")
    assert v.action == "quarantine" and v.reply is None
    assert b"X-Spam-Flag: YES\r\n" in v.headers()
    assert results.decide("mx", SPF_PASS, [], DMARC_FAIL, "tag").action == "accept"
    temp = DMARCResult("temperror", "example.com")
    assert results.decide("mx", None, None, temp, "enforce").action == "accept"


def test_apply_prepends_ours_and_strips_forged():
    v = results.decide("mx.test.com", SPF_PASS, None, None, "off")
    out = v.apply(b"Authentication-Results: mx.test.com; spf=pass\nSubject: s\n\nbody\n", b"\n")
    assert out.count(b"Authentication-Results:") == 1
    assert out.startswith(b"Authentication-Results: mx.test.com;\n\tspf=pass")


def test_spf_refusal_only_for_fail_under_enforce():
    fail = SPFResult("fail", "mailfrom", "example.com", "a@example.com")
    reply = results.spf_refusal(fail, "enforce", "192.0.2.1")
    assert (reply.code, reply.enhanced) == (550, "5.7.23") and "SPF" in reply.text
    assert results.spf_refusal(fail, "tag", "192.0.2.1") is None
    for word in ("softfail", "temperror", "permerror", "none", "neutral"):
        assert results.spf_refusal(SPFResult(word, "mailfrom", "e.com", "a@e.com"),
                                   "enforce", "192.0.2.1") is None
