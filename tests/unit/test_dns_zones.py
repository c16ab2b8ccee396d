"""The zone model shared by the test DNS server and FakeResolver, and FakeResolver itself."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from mailappliance.dns import DNSPermanentError, DNSTemporaryError, IResolver
from mailappliance.testing.resolver import FakeResolver
from mailappliance.testing.zones import ZoneSet, txt_chunks

ZONES = {
    "example.test": {
        "$ttl": 600, "$minimum": 30,
        "@": [["MX", "10 mx1"], ["MX", "20 mx2.example.test."]],
        "mx1": [["A", "192.0.2.1"], ["AAAA", "2001:db8::1", 50]],
        "www": [["CNAME", "mx1"]],
        "loop1": [["CNAME", "loop2"]], "loop2": [["CNAME", "loop1"]],
        "out": [["CNAME", "elsewhere.invalid."]],
        "a.b.deep": [["A", "192.0.2.9"]],
        "*.wild": [["A", "192.0.2.7"]],
    },
    "nomail.test": {"@": [["MX", "0 ."]]},
}


@pytest.fixture
def zones():
    return ZoneSet(ZONES)


def test_positive_answer_with_default_and_own_ttls(zones):
    r = zones.lookup("MX1.example.test.", "a")
    assert r.rcode == "NOERROR" and [(x.value, x.ttl) for x in r.answer] == [("192.0.2.1", 600)]
    assert zones.lookup("mx1.example.test", "AAAA").answer[0].ttl == 50


def test_relative_and_absolute_targets(zones):
    assert [x.value for x in zones.lookup("example.test", "MX").answer] == [
        "10 mx1.example.test", "20 mx2.example.test"]


def test_nxdomain_and_nodata_carry_the_soa(zones):
    nx = zones.lookup("nope.example.test", "A")
    assert nx.rcode == "NXDOMAIN" and nx.authority[0].rdtype == "SOA"
    assert nx.authority[0].value.endswith(" 30") and nx.authority[0].ttl == 600
    nodata = zones.lookup("mx1.example.test", "TXT")
    assert nodata.rcode == "NOERROR" and nodata.answer == () and nodata.authority


def test_empty_non_terminal_exists(zones):
    assert zones.lookup("b.deep.example.test", "A").rcode == "NOERROR"


def test_cname_is_followed_inside_the_zones(zones):
    r = zones.lookup("www.example.test", "A")
    assert [(x.rdtype, x.value) for x in r.answer] == [("CNAME", "mx1.example.test"),
                                                       ("A", "192.0.2.1")]
    assert [x.rdtype for x in zones.lookup("www.example.test", "CNAME").answer] == ["CNAME"]
    assert zones.lookup("out.example.test", "A").answer[-1].value == "elsewhere.invalid"
    assert len(zones.lookup("loop1.example.test", "A").answer) == 8     # bounded


def test_wildcard(zones):
    assert zones.lookup("anything.wild.example.test", "A").answer[0].value == "192.0.2.7"
    assert zones.lookup("anything.wild.example.test", "A").answer[0].owner == \
        "anything.wild.example.test"


def test_outside_every_zone_is_refused(zones):
    assert zones.lookup("example.org", "A").rcode == "REFUSED"


def test_bad_zone_data_is_rejected():
    with pytest.raises(ValueError):
        ZoneSet({"x.test": {"@": [["BOGUS", "1"]]}})
    with pytest.raises(ValueError):
        ZoneSet({"x.test": {"@": [["A"]]}})


def test_txt_chunks_are_at_most_255_octets():
    assert [len(c) for c in txt_chunks("x" * 600)] == [255, 255, 90]
    assert txt_chunks("") == [b""]


# --- FakeResolver -----------------------------------------------------------------------------

def result_of(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_fake_provides_iresolver():
    assert verifyObject(IResolver, FakeResolver())


def test_fake_answers_like_the_server_would():
    r = FakeResolver(ZONES)
    assert result_of(r.query("www.example.test", "A")).addresses() == ["192.0.2.1"]
    assert result_of(r.query("www.example.test", "A")).canonical_name == "mx1.example.test"
    nx = result_of(r.query("nope.example.test", "A"))
    assert nx.nxdomain and nx.ttl == 30
    assert result_of(r.mx_hosts("example.test")) == [(10, "mx1.example.test"),
                                                     (20, "mx2.example.test")]
    assert result_of(r.addresses("mx1.example.test")) == ["192.0.2.1", "2001:db8::1"]
    assert result_of(r.mx_hosts("nomail.test")).check(DNSPermanentError)
    assert result_of(r.query("example.org", "A")).check(DNSTemporaryError)
    assert r.count("example.test", "MX") == 1 and r.count() == 8


def test_fake_failures_and_hangs():
    r = FakeResolver(ZONES)
    r.fail("example.test", "servfail")
    assert "SERVFAIL" in result_of(r.query("mx1.example.test", "A")).value.reason
    r.fail("mx1.example.test", "hang")                 # the longer suffix wins
    d = r.query("mx1.example.test", "A")
    assert not d.called and r.hanging == [d]
    d.cancel()
    r.heal("mx1.example.test")
    r.heal("example.test")
    assert result_of(r.query("mx1.example.test", "A")).addresses() == ["192.0.2.1"]
    with pytest.raises(ValueError):
        r.fail("x.test", "explode")
