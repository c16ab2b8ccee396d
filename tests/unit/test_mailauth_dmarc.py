"""DMARC (RFC 7489): record parsing, organisational domains from the bundled Public Suffix List,
alignment, policy discovery and the policy applied (pct= sampling, sp= for subdomains)."""

from __future__ import annotations

import pytest

from mailappliance.mailauth import dmarc
from mailappliance.mailauth.lookup import DNSResult, run_sync


@pytest.mark.parametrize("domain, org", [
    ("example.com", "example.com"),
    ("mail.sub.example.com", "example.com"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("co.uk", "co.uk"),                       # a public suffix is its own organisational domain
    ("user.github.io", "user.github.io"),     # a private suffix of the list
    ("x.y.example.test", "example.test"),     # unknown TLD: the default rule "*"
])
def test_org_domain_from_the_bundled_list(domain, org):
    assert dmarc.org_domain(domain) == org


def test_alignment_relaxed_and_strict():
    assert dmarc.aligned("mail.example.com", "example.com", "r")
    assert not dmarc.aligned("mail.example.com", "example.com", "s")
    assert dmarc.aligned("EXAMPLE.com.", "example.com", "s")
    assert not dmarc.aligned("example.net", "example.com", "r")
    assert not dmarc.aligned("a.co.uk", "b.co.uk", "r")


@pytest.mark.parametrize("text, record", [
    ("v=DMARC1; p=reject", dmarc.DMARCRecord("reject")),
    ("v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20",
     dmarc.DMARCRecord("quarantine", "none", "s", "s", 20)),
    ("v=DMARC1; p=NONE; pct=abc; adkim=x", dmarc.DMARCRecord("none")),     # bad values ignored
    ("v=DMARC1; p=bogus; rua=mailto:d@example.com", dmarc.DMARCRecord("none")),  # 6.6.3
    ("v=DMARC1; p=reject; pct=250", dmarc.DMARCRecord("reject", pct=100)),
])
def test_parse_record(text, record):
    assert dmarc.parse_record(text) == record


@pytest.mark.parametrize("text", ["v=DMARC1", "v=DMARC1; p=bogus", "p=reject; v=DMARC1",
                                  "v=DMARC2; p=reject", "v=DMARC1; p=reject; ===",
                                  "v=DMARC1; p=reject; " + "x=y; " * 1000])
def test_unusable_records(text):
    with pytest.raises(dmarc.DMARCSyntaxError):
        dmarc.parse_record(text)


def answers(table):
    return lambda q: table.get((q.name, q.rdtype), DNSResult("nxdomain"))


def test_discovery_falls_back_to_the_organisational_domain():
    table = {("_dmarc.example.com", "TXT"): DNSResult("ok", ("v=DMARC1; p=reject; sp=quarantine",))}
    record, status, where = run_sync(dmarc.discover("mail.example.com"), answers(table))
    assert (record.p, status, where) == ("reject", "ok", "example.com")


def test_discovery_ignores_other_txt_and_refuses_two_records():
    table = {("_dmarc.a.com", "TXT"): DNSResult("ok", ("hello", "v=DMARC1; p=reject")),
             ("_dmarc.b.com", "TXT"): DNSResult("ok", ("v=DMARC1; p=reject", "v=DMARC1; p=none"))}
    assert run_sync(dmarc.discover("a.com"), answers(table))[1] == "ok"
    assert run_sync(dmarc.discover("b.com"), answers(table))[:2] == (None, "none")


def test_discovery_temperror():
    table = {("_dmarc.a.com", "TXT"): DNSResult("temperror", reason="timeout")}
    assert run_sync(dmarc.discover("a.com"), answers(table))[1] == "temperror"


def evaluate(record, spf="none", spf_domain="", dkim=(), sample=0.0, from_domain="example.com",
             record_domain="example.com"):
    return dmarc.evaluate(from_domain, dmarc.parse_record(record), record_domain, spf, spf_domain,
                          list(dkim), sample)


def test_pass_by_aligned_dkim_or_spf():
    assert evaluate("v=DMARC1; p=reject", dkim=["mail.example.com"]).result == "pass"
    assert evaluate("v=DMARC1; p=reject", spf="pass", spf_domain="bounce.example.com").result \
        == "pass"
    r = evaluate("v=DMARC1; p=reject; adkim=s", dkim=["mail.example.com"])
    assert (r.result, r.disposition) == ("fail", "reject")


def test_spf_pass_of_another_domain_or_softfail_does_not_align():
    assert evaluate("v=DMARC1; p=reject", spf="pass", spf_domain="example.net").result == "fail"
    assert evaluate("v=DMARC1; p=reject", spf="softfail",
                    spf_domain="example.com").result == "fail"


def test_pct_outside_the_sample_takes_the_milder_policy():
    assert evaluate("v=DMARC1; p=reject; pct=50", sample=0.49).disposition == "reject"
    assert evaluate("v=DMARC1; p=reject; pct=50", sample=0.5).disposition == "quarantine"
    assert evaluate("v=DMARC1; p=quarantine; pct=0", sample=0.0).disposition == "none"


def test_subdomain_policy_applies_below_the_record_domain():
    r = evaluate("v=DMARC1; p=reject; sp=quarantine", from_domain="x.example.com")
    assert (r.policy, r.disposition) == ("quarantine", "quarantine")


def test_several_from_domains_the_strictest_wins():
    table = {("_dmarc.a.com", "TXT"): DNSResult("ok", ("v=DMARC1; p=none",)),
             ("_dmarc.b.com", "TXT"): DNSResult("ok", ("v=DMARC1; p=reject",))}
    r = run_sync(dmarc.check(["a.com", "b.com"], "several From: fields", "none", "", [], 0.0),
                 answers(table))
    assert (r.domain, r.result, r.disposition) == ("b.com", "fail", "reject")


def test_no_from_is_permerror_and_never_enforced():
    r = run_sync(dmarc.check([], "no From: field", "pass", "x.com", [], 0.0), answers({}))
    assert (r.result, r.disposition) == ("permerror", "none")
