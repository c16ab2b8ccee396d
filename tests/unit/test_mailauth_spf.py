"""SPF (RFC 7208) evaluation: the pure check driven with a FakeResolver and a Clock.

Each SPF result word is reached, each limit of section 4.6.4 is hit, and the macro examples of
section 7.4 expand as the RFC prints them.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mailappliance.mailauth import spf
from mailappliance.mailauth.lookup import DNSResult, run_sync
from mailappliance.mailauth.service import SPF_TIMEOUT, run_check
from mailappliance.testing.resolver import FakeResolver

ZONES = {
    "example.test": {
        "@": [["TXT", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 a:relay.example.test mx include:inc.test "
                      "-all"], ["MX", "10 mx1"], ["TXT", "some other text"]],
        "relay": [["A", "198.51.100.7"]],
        "mx1": [["A", "198.51.100.20"], ["AAAA", "2001:db8:ffff::20"]],
        "soft": [["TXT", "v=spf1 ~all"]],
        "neutral": [["TXT", "v=spf1 ?all"]],
        "plus": [["TXT", "v=spf1 +all"]],
        "none": [["TXT", "not spf"]],
        "two": [["TXT", "v=spf1 -all"], ["TXT", "v=spf1 +all"]],
        "syntax": [["TXT", "v=spf1 ip4:192.0.2.1/33 -all"]],
        "unknownmech": [["TXT", "v=spf1 foo:bar -all"]],
        "badmacro": [["TXT", "v=spf1 a:%{z}.example.test -all"]],
        "loop1": [["TXT", "v=spf1 include:loop2.example.test -all"]],
        "loop2": [["TXT", "v=spf1 include:loop1.example.test -all"]],
        "redir": [["TXT", "v=spf1 redirect=soft.example.test"]],
        "redirnone": [["TXT", "v=spf1 redirect=none.example.test"]],
        "incnone": [["TXT", "v=spf1 include:none.example.test -all"]],
        "voids": [["TXT", "v=spf1 a:n1.example.test a:n2.example.test a:n3.example.test "
                          "ip4:192.0.2.9 -all"]],
        "twovoids": [["TXT", "v=spf1 a:n1.example.test a:n2.example.test ip4:192.0.2.9 -all"]],
        "exists": [["TXT", "v=spf1 exists:%{ir}.allow.example.test -all"]],
        "3.2.0.192.allow": [["A", "127.0.0.2"]],
        "cidr": [["TXT", "v=spf1 a:relay.example.test/24 -all"]],
        "ptr": [["TXT", "v=spf1 ptr:example.test -all"]],
        "ptrhost": [["A", "192.0.2.3"]],
        "manymx": [["TXT", "v=spf1 mx -all"]] + [["MX", f"{i} h{i}"] for i in range(11)],
        "huge": [["TXT", "v=spf1 " + " ".join(f"ip4:10.0.{i // 250}.{i % 250}"
                                              for i in range(400)) + " -all"]],
        "temp": [["TXT", "v=spf1 include:broken.test -all"]],
        "mod": [["TXT", "v=spf1 exp=explain.example.test foo=bar -all"]],
        "dupmod": [["TXT", "v=spf1 redirect=a.example.test redirect=b.example.test"]],
        "mapped": [["TXT", "v=spf1 ip4:192.0.2.55 -all"]],
    },
    "inc.test": {"@": [["TXT", "v=spf1 ip4:203.0.113.0/24 ?all"]]},
    "chain.test": {f"c{i}": [["TXT", f"v=spf1 include:c{i + 1}.chain.test -all"]]
                   for i in range(12)},
    "helo.test": {"@": [["TXT", "v=spf1 ip4:192.0.2.77 -all"]]},
    "2.0.192.in-addr.arpa": {"3": [["PTR", "ptrhost.example.test"]]},
}


def check(ip: str, mail_from: str, helo: str = "client.test", resolver=None, clock=None):
    resolver = resolver or FakeResolver(ZONES)
    clock = clock or Clock()
    d = run_check(spf.check(ip, mail_from, helo), resolver, clock, SPF_TIMEOUT)
    if d.called:
        results = []
        d.addBoth(results.append)
        return results[0]
    return d, resolver, clock


@pytest.mark.parametrize("ip, sender, result", [
    ("192.0.2.10", "a@example.test", "pass"),             # ip4
    ("2001:db8::1", "a@example.test", "pass"),            # ip6
    ("198.51.100.7", "a@example.test", "pass"),           # a:relay
    ("198.51.100.20", "a@example.test", "pass"),          # mx (A of mx1)
    ("2001:db8:ffff::20", "a@example.test", "pass"),      # inside ip6:2001:db8::/32 anyway
    ("203.0.113.5", "a@example.test", "pass"),            # include: pass
    ("198.18.0.1", "a@example.test", "fail"),             # -all
    ("198.18.0.1", "a@soft.example.test", "softfail"),
    ("198.18.0.1", "a@neutral.example.test", "neutral"),
    ("198.18.0.1", "a@plus.example.test", "pass"),
    ("198.18.0.1", "a@none.example.test", "none"),        # TXT, but no v=spf1
    ("198.18.0.1", "a@nxdomain.example.test", "none"),    # NXDOMAIN
    ("198.18.0.1", "a@two.example.test", "permerror"),    # two SPF records
    ("192.0.2.1", "a@syntax.example.test", "permerror"),  # bad prefix: nothing evaluated
    ("198.18.0.1", "a@unknownmech.example.test", "permerror"),
    ("198.18.0.1", "a@badmacro.example.test", "permerror"),
    ("198.18.0.1", "a@redir.example.test", "softfail"),
    ("198.18.0.1", "a@redirnone.example.test", "permerror"),
    ("198.18.0.1", "a@incnone.example.test", "permerror"),
    ("192.0.2.3", "a@exists.example.test", "pass"),
    ("192.0.2.4", "a@exists.example.test", "fail"),
    ("198.51.100.99", "a@cidr.example.test", "pass"),     # a/24
    ("192.0.2.3", "a@ptr.example.test", "pass"),          # ptr, validated forward
    ("192.0.2.4", "a@ptr.example.test", "fail"),
    ("198.18.0.1", "a@mod.example.test", "fail"),         # exp= and unknown modifiers ignored
    ("198.18.0.1", "a@dupmod.example.test", "permerror"),
    ("::ffff:192.0.2.55", "a@mapped.example.test", "pass"),   # IPv4-mapped counts as IPv4
])
def test_results(ip, sender, result):
    assert check(ip, sender).result == result


def test_fail_names_the_deciding_term_and_domain():
    r = check("198.18.0.1", "someone@example.test")
    assert (r.result, r.identity, r.domain, r.sender) == ("fail", "mailfrom", "example.test",
                                                         "someone@example.test")
    assert r.reason == "-all in example.test"


def test_null_sender_checks_helo_as_postmaster():
    r = check("192.0.2.77", "", helo="helo.test")
    assert (r.result, r.identity, r.domain, r.sender) == ("pass", "helo", "helo.test",
                                                         "postmaster@helo.test")
    assert check("192.0.2.78", "<>", helo="helo.test").result == "fail"


def test_helo_that_is_no_domain_is_none_without_lookups():
    resolver = FakeResolver(ZONES)
    for helo in ("[192.0.2.1]", "localhost", ""):
        assert check("192.0.2.1", "", helo=helo, resolver=resolver).result == "none"
    assert resolver.queries == []


def test_include_loop_is_permerror_at_the_lookup_limit():
    r = check("198.18.0.1", "a@loop1.example.test")
    assert r.result == "permerror"
    assert "more than 10 DNS lookups" in r.reason


def test_eleven_nested_includes_are_permerror():
    r = check("198.18.0.1", "a@c0.chain.test")
    assert r.result == "permerror" and r.lookups == 11


def test_third_void_lookup_is_permerror_two_are_allowed():
    assert check("198.18.0.1", "a@voids.example.test").result == "permerror"
    assert check("192.0.2.9", "a@twovoids.example.test").result == "pass"


def test_more_than_ten_mx_is_permerror():
    assert check("198.18.0.1", "a@manymx.example.test").result == "permerror"


def test_huge_record_is_permerror_without_further_lookups():
    resolver = FakeResolver(ZONES)
    r = check("10.0.0.1", "a@huge.example.test", resolver=resolver)
    assert r.result == "permerror" and "octets" in r.reason
    assert resolver.queries == [("huge.example.test", "TXT")]


def test_servfail_is_temperror():
    resolver = FakeResolver(ZONES)
    resolver.fail("broken.test", "servfail")
    r = check("198.18.0.1", "a@temp.example.test", resolver=resolver)
    assert r.result == "temperror"
    resolver.fail("example.test", "timeout")
    assert check("192.0.2.1", "a@example.test", resolver=resolver).result == "temperror"


def test_silent_dns_is_temperror_at_the_deadline_and_the_query_is_cancelled():
    resolver = FakeResolver(ZONES)
    resolver.fail("broken.test", "hang")
    clock = Clock()
    d, _, _ = check("198.18.0.1", "a@temp.example.test", resolver=resolver, clock=clock)
    results = []
    d.addBoth(results.append)
    clock.advance(SPF_TIMEOUT - 0.1)
    assert results == []
    clock.advance(0.2)
    assert results[0].result == "temperror"
    assert resolver.hanging[0].called          # cancelled, not left dangling
    assert clock.getDelayedCalls() == []


def test_sender_without_domain_is_none():
    assert check("192.0.2.1", "justlocal").result == "none"


# --- macros: RFC 7208 section 7.4 ------------------------------------------------------------

MACRO_EXAMPLES = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%%%_%-", "% %20"),
]


@pytest.mark.parametrize("macro, expanded", MACRO_EXAMPLES)
def test_macro_examples_of_rfc7208(macro, expanded):
    ctx = spf._Context(spf.client_address("192.0.2.3"), "strong-bad@email.example.com", "h")
    assert ctx.expand(macro, "email.example.com") == expanded


def test_ipv6_macro_example_of_rfc7208():
    ctx = spf._Context(spf.client_address("2001:db8::cb01"), "strong-bad@email.example.com",
                       "h")
    assert ctx.expand("%{ir}.%{v}._spf.%{d2}", "email.example.com") == \
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"


def test_expanded_name_longer_than_253_loses_labels_on_the_left():
    ctx = spf._Context(spf.client_address("192.0.2.3"), ("x" * 60 + ".") * 3 + "x@e.test",
                       "h")
    name = ctx.target("%{l}.%{l}.example.test", "e.test")
    assert name is not None and len(name) <= 253 and name.endswith(".example.test")


@pytest.mark.parametrize("record", [
    "v=spf1 ip4:1.2.3.4/024",                 # leading zero in a prefix
    "v=spf1 ip4:1.2.3",                       # not an address
    "v=spf1 ip6:2001:db8::/129",
    "v=spf1 a/33",
    "v=spf1 include",                         # include needs a domain
    "v=spf1 all:foo",
    "v=spf1 a:%{c}.example.test",             # c is only for exp=
    "v=spf1 a:%{d0}.example.test",            # transformer 0
    "v=spf1 a:example",                       # no top-level label
    "v=spf1 include:example.123",             # numeric top-level label
    "v=spf1 -all \x01",
    "v=spf1 exp=a.test exp=b.test",
])
def test_syntax_errors_are_permerror(record):
    with pytest.raises(spf._PermError):
        spf.parse_record(record)


@pytest.mark.parametrize("record", [
    "v=spf1", "v=spf1 -all", "v=spf1  ip4:1.2.3.4/0 ~all", "V=SPF1 MX/24//64 A:x.test/8 ?ALL",
    "v=spf1 exists:%{i}._spf.%{d} -all", "v=spf1 ptr ptr:x.test -all",
    "v=spf1 include:_spf.%{d}. -all", "v=spf1 custom-mod=%{s} -all",
])
def test_valid_records_parse(record):
    spf.parse_record(record)


def test_run_sync_drives_the_same_generator_with_a_dict():
    answers = {("x.test", "TXT"): DNSResult("ok", ("v=spf1 ip4:192.0.2.1 -all",))}
    r = run_sync(spf.check("192.0.2.1", "a@x.test", "h"),
                 lambda q: answers.get((q.name, q.rdtype), DNSResult("nxdomain")))
    assert r.result == "pass"


def test_parsed_records_are_remembered_within_their_bound():
    spf._parsed.clear()
    first = spf.parsed_record("v=spf1 ip4:192.0.2.0/24 -all")
    assert spf.parsed_record("v=spf1 ip4:192.0.2.0/24 -all") is first
    for i in range(spf.PARSED_RECORDS + 5):
        spf.parsed_record(f"v=spf1 ip4:10.0.{i // 250}.{i % 250} -all")
    assert len(spf._parsed) <= spf.PARSED_RECORDS
    with pytest.raises(spf._PermError):
        spf.parsed_record("v=spf1 bogus")
    assert "v=spf1 bogus" not in spf._parsed
