"""The pure half of mailappliance.dns: resolv.conf, reply checking, answers, cache, MX rules."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, strategies as st

from mailappliance.dns import (
    DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_ATTEMPTS, MAX_ATTEMPTS, MAX_CACHE_TTL, MAX_NAMESERVERS,
    MAX_NEGATIVE_TTL, Answer, DNSPermanentError, DNSTemporaryError, TTLCache,
    answer_from_reply, cache_lifetime, decode_reply, fast_answer, is_truncated_reply,
    make_query, merge_addresses, mx_order, normalize_name, parse_reply, parse_resolv_conf,
    rdtype_of)


# --- resolv.conf ------------------------------------------------------------------------------

def test_resolv_conf_nameservers_options_and_comments():
    conf = parse_resolv_conf(
        "# comment\nsearch example.com\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\n"
        "; other comment\nnameserver not-an-ip\noptions timeout:2 attempts:3 rotate ndots:2\n")
    assert conf.nameservers == (("10.0.0.1", 53), ("fe80::1", 53))
    assert conf.attempt_timeout == 2.0 and conf.attempts == 3 and conf.rotate


def test_resolv_conf_keeps_at_most_three_servers_like_glibc():
    text = "".join(f"nameserver 10.0.0.{i}\n" for i in range(1, 6))
    assert len(parse_resolv_conf(text).nameservers) == MAX_NAMESERVERS == 3


def test_resolv_conf_without_servers_means_localhost_and_defaults():
    conf = parse_resolv_conf("")
    assert conf.nameservers == (("127.0.0.1", 53),)
    assert (conf.attempt_timeout, conf.attempts, conf.rotate) == (
        DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_ATTEMPTS, False)


def test_resolv_conf_option_values_are_clamped():
    conf = parse_resolv_conf("nameserver 1.1.1.1\noptions timeout:999 attempts:0\n")
    assert conf.attempt_timeout == 30.0 and conf.attempts == 1
    assert parse_resolv_conf("options attempts:99").attempts == MAX_ATTEMPTS


# --- names and types --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Example.COM.", "example.com"), ("example.com", "example.com"), (".", "."),
    ("2.0.0.127.bl.test", "2.0.0.127.bl.test")])
def test_normalize_name(text, expected):
    assert normalize_name(text) == expected


@pytest.mark.parametrize("bad", ["a..b", "x" * 64 + ".com", ("a." * 130) + "com"])
def test_normalize_name_rejects_what_dns_cannot_carry(bad):
    with pytest.raises(ValueError):
        normalize_name(bad)


def test_rdtype_of_accepts_text_and_numbers():
    assert rdtype_of("mx") == dns.rdatatype.MX == rdtype_of(15)


# --- reply checking ---------------------------------------------------------------------------

def _msg(query):
    """Our Query as dnspython reads it from the wire."""
    return dns.message.from_wire(query.wire)


def _reply(query, rcode=dns.rcode.NOERROR, answer=(), authority=()):
    r = dns.message.make_response(_msg(query))
    r.set_rcode(rcode)
    for rr in answer:
        r.answer.append(dns.rrset.from_text(*rr))
    for rr in authority:
        r.authority.append(dns.rrset.from_text(*rr))
    # Through the wire and back, as a reply really arrives (this also builds dnspython's index).
    return dns.message.from_wire(r.to_wire())


def test_query_ids_are_random_and_queries_carry_edns():
    ids = {make_query("a.test", dns.rdatatype.A).qid for _ in range(50)}
    assert len(ids) > 40
    q = _msg(make_query("Mixed.Case.test", dns.rdatatype.MX, qid=4321))
    assert q.id == 4321 and q.flags & dns.flags.RD and not q.flags & dns.flags.QR
    assert q.question[0].name.to_text() == "Mixed.Case.test." and q.question[0].rdtype == 15
    assert q.edns == 0 and q.payload == 1232
    assert _msg(make_query("a.test", dns.rdatatype.A, use_edns=False)).edns < 0
    assert _msg(make_query(".", dns.rdatatype.NS)).question[0].name == dns.name.root


def test_hand_built_query_is_byte_identical_to_dnspythons():
    ours = make_query("2.0.0.127.bl.test", dns.rdatatype.A, qid=7)
    theirs = dns.message.make_query("2.0.0.127.bl.test.", "A", use_edns=0, payload=1232)
    theirs.id = 7
    assert ours.wire == theirs.to_wire()


_label = st.from_regex(r"[a-zA-Z0-9_](?:[a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?", fullmatch=True)


@given(st.lists(_label, min_size=1, max_size=3), st.booleans())
def test_the_ldh_shortcut_encodes_names_as_dnspython_does(labels, dot):
    text = ".".join(labels) + ("." if dot else "")
    expected = dns.name.from_text(text).to_text(omit_final_dot=True).lower()
    assert normalize_name(text) == expected
    ours = make_query(expected, dns.rdatatype.A, qid=1)
    theirs = dns.message.make_query(expected + ".", "A", use_edns=0, payload=1232)
    theirs.id = 1
    assert ours.wire == theirs.to_wire()


def test_parse_reply_accepts_the_matching_reply_only():
    q = make_query("a.test", dns.rdatatype.A)
    good = _reply(q).to_wire()
    assert parse_reply(good, q) is not None
    other = make_query("a.test", dns.rdatatype.A, qid=(q.qid + 1) % 65536)
    assert parse_reply(_reply(other).to_wire(), q) is None          # wrong id
    b = make_query("b.test", 1, qid=q.qid)
    assert parse_reply(_reply(b).to_wire(), q) is None              # wrong question
    aaaa = make_query("a.test", dns.rdatatype.AAAA, qid=q.qid)
    assert parse_reply(_reply(aaaa).to_wire(), q) is None           # wrong type
    assert parse_reply(q.wire, q) is None                           # a query, not a reply
    assert parse_reply(b"\x00" * 5, q) is None                      # garbage
    assert parse_reply(good[:20], q) is None                        # cut short


def test_a_reply_with_the_name_in_other_case_still_matches():
    q = make_query("a.test", dns.rdatatype.A)
    r = dns.message.make_response(_msg(make_query("A.TeSt", dns.rdatatype.A, qid=q.qid)))
    assert parse_reply(r.to_wire(), q) is not None


def test_truncation_is_read_from_the_header_of_a_matching_reply():
    q = make_query("a.test", dns.rdatatype.TXT)
    r = _reply(q)
    r.flags |= dns.flags.TC
    wire = r.to_wire()
    assert is_truncated_reply(wire, q)
    # A body cut in the middle (as servers truncate) still counts: header and question suffice.
    assert is_truncated_reply(wire[:12 + len(q.question)], q)
    assert not is_truncated_reply(_reply(q).to_wire(), q)
    other = make_query("a.test", dns.rdatatype.TXT, qid=(q.qid + 1) % 65536)
    assert not is_truncated_reply(wire, other)


def test_answer_positive_follows_cname_and_takes_the_smallest_ttl():
    q = make_query("www.example.test", dns.rdatatype.A)
    r = _reply(q, answer=[("www.example.test.", 600, "IN", "CNAME", "host.example.test."),
                          ("host.example.test.", 120, "IN", "A", "192.0.2.1", "192.0.2.2")])
    a = answer_from_reply("www.example.test", dns.rdatatype.A, r)
    assert sorted(a.addresses()) == ["192.0.2.1", "192.0.2.2"]
    assert a.ttl == 120 and a.canonical_name == "host.example.test"
    assert not a.nxdomain and not a.nodata


def test_answer_nxdomain_ttl_is_min_of_soa_ttl_and_minimum():
    q = make_query("x.bl.test", dns.rdatatype.A)
    soa = ("bl.test.", 900, "IN", "SOA", "ns.bl.test. h.bl.test. 1 3600 600 86400 45")
    a = answer_from_reply("x.bl.test", 1, _reply(q, dns.rcode.NXDOMAIN, authority=[soa]))
    assert a.nxdomain and a.records == () and a.ttl == 45
    soa_short = ("bl.test.", 10, "IN", "SOA", "ns.bl.test. h.bl.test. 1 3600 600 86400 45")
    assert answer_from_reply("x.bl.test", 1,
                             _reply(q, dns.rcode.NXDOMAIN, authority=[soa_short])).ttl == 10


def test_negative_answer_without_soa_is_not_cached():
    q = make_query("x.bl.test", dns.rdatatype.A)
    assert answer_from_reply("x.bl.test", 1, _reply(q, dns.rcode.NXDOMAIN)).ttl == 0


def test_soa_of_an_unrelated_zone_does_not_set_the_negative_ttl():
    q = make_query("x.bl.test", dns.rdatatype.A)
    soa = ("other.test.", 900, "IN", "SOA", "ns.o.test. h.o.test. 1 3600 600 86400 45")
    assert answer_from_reply("x.bl.test", 1,
                             _reply(q, dns.rcode.NXDOMAIN, authority=[soa])).ttl == 0


def test_cname_loops_are_bounded():
    q = make_query("a.test", dns.rdatatype.A)
    r = _reply(q, answer=[("a.test.", 60, "IN", "CNAME", "b.test."),
                          ("b.test.", 60, "IN", "CNAME", "a.test.")])
    with pytest.raises(DNSTemporaryError, match="CNAME chain"):
        answer_from_reply("a.test", 1, r)


def test_records_of_other_names_or_types_are_not_the_answer():
    q = make_query("a.test", dns.rdatatype.A)
    r = _reply(q, answer=[("evil.test.", 60, "IN", "A", "6.6.6.6"),
                          ("a.test.", 60, "IN", "AAAA", "2001:db8::1")])
    assert answer_from_reply("a.test", 1, r).nodata


def test_answer_nodata_is_noerror_without_records():
    q = make_query("a.test", dns.rdatatype.AAAA)
    a = answer_from_reply("a.test", dns.rdatatype.AAAA, _reply(q))
    assert a.nodata and not a.nxdomain


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP,
                                   dns.rcode.FORMERR])
def test_answer_other_rcodes_are_temporary(rcode):
    q = make_query("a.test", dns.rdatatype.A)
    with pytest.raises(DNSTemporaryError) as e:
        answer_from_reply("a.test", 1, _reply(q, rcode))
    assert dns.rcode.to_text(rcode) in e.value.reason


def test_answer_nxdomain_with_records_is_not_trusted():
    q = make_query("a.test", dns.rdatatype.A)
    r = _reply(q, dns.rcode.NXDOMAIN, answer=[("a.test.", 60, "IN", "A", "192.0.2.1")])
    with pytest.raises(DNSTemporaryError):
        answer_from_reply("a.test", 1, r)


def test_txt_strings_are_joined_per_record():
    q = make_query("t.test", dns.rdatatype.TXT)
    r = _reply(q, answer=[("t.test.", 60, "IN", "TXT", '"first part " "second"')])
    assert answer_from_reply("t.test", dns.rdatatype.TXT, r).texts() == ["first part second"]


# --- the fast path agrees with dnspython -----------------------------------------------------

def _outcome(f):
    try:
        a = f()
    except DNSTemporaryError as e:
        return ("temporary", e.reason)
    if a is None:
        return None
    return (int(a.rcode), sorted(r.to_text() for r in a.records), a.ttl, a.nxdomain, a.nodata)


_owner = st.sampled_from(["q.bl.test.", "Q.BL.test.", "other.test.", "sub.q.bl.test."])
_soa_owner = st.sampled_from(["bl.test.", "test.", ".", "other.test.", "q.bl.test.",
                              "l.test."])
_rr = st.one_of(
    st.tuples(_owner, st.integers(0, 10 ** 6), st.just("A"),
              st.sampled_from(["127.0.0.2", "127.0.0.3", "10.0.0.1"])),
    st.tuples(_owner, st.integers(0, 10 ** 6), st.just("AAAA"), st.just("2001:db8::1")),
    st.tuples(_owner, st.integers(0, 10 ** 6), st.just("CNAME"), st.just("x.bl.test.")),
    st.tuples(_owner, st.integers(0, 10 ** 6), st.just("TXT"), st.just('"why"')))
_soa = st.tuples(_soa_owner, st.integers(0, 10 ** 6), st.just("SOA"),
                 st.integers(0, 10 ** 6).map(lambda m: f"ns.bl.test. h.bl.test. 1 2 3 4 {m}"))


@given(qtype=st.sampled_from(["A", "AAAA", "TXT"]),
       rcode=st.sampled_from([dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL,
                              dns.rcode.REFUSED]),
       answer=st.lists(_rr, max_size=3), authority=st.lists(_soa, max_size=2),
       edns=st.booleans(), compress=st.booleans())
def test_fast_path_agrees_with_dnspython(qtype, rcode, answer, authority, edns, compress):
    rdtype = dns.rdatatype.from_text(qtype)
    q = make_query("q.bl.test", rdtype, use_edns=edns)
    r = dns.message.make_response(_msg(q))
    r.set_rcode(rcode)
    for owner, ttl, t, value in answer:
        r.find_rrset(r.answer, dns.name.from_text(owner), 1, dns.rdatatype.from_text(t),
                     create=True).add(dns.rdata.from_text(1, dns.rdatatype.from_text(t), value),
                                      ttl)
    for owner, ttl, t, value in authority:
        r.find_rrset(r.authority, dns.name.from_text(owner), 1, dns.rdatatype.SOA,
                     create=True).add(dns.rdata.from_text(1, dns.rdatatype.SOA, value), ttl)
    wire = r.to_wire() if compress else r.to_wire(max_size=65535, origin=None)
    slow = _outcome(lambda: answer_from_reply("q.bl.test", rdtype,
                                              dns.message.from_wire(wire)))
    fast = _outcome(lambda: fast_answer("q.bl.test", rdtype, q, wire))
    if fast is not None:
        assert fast == slow
    assert _outcome(lambda: decode_reply("q.bl.test", rdtype, q, wire)) == slow


def test_fast_path_takes_the_dnsbl_shapes():
    q = make_query("2.0.0.127.bl.test", dns.rdatatype.A)
    soa = ("bl.test.", 900, "IN", "SOA", "ns.bl.test. h.bl.test. 1 3600 600 86400 45")
    nx = _reply(q, dns.rcode.NXDOMAIN, authority=[soa]).to_wire()
    listed = _reply(q, answer=[("2.0.0.127.bl.test.", 60, "IN", "A", "127.0.0.2")]).to_wire()
    assert fast_answer("2.0.0.127.bl.test", 1, q, nx).ttl == 45
    assert fast_answer("2.0.0.127.bl.test", 1, q, listed).addresses() == ["127.0.0.2"]
    with pytest.raises(DNSTemporaryError, match="SERVFAIL"):
        fast_answer("2.0.0.127.bl.test", 1, q, _reply(q, dns.rcode.SERVFAIL).to_wire())
    # Shapes it leaves to dnspython: other types, CNAMEs, compression loops.
    t = make_query("2.0.0.127.bl.test", dns.rdatatype.TXT)
    assert fast_answer("2.0.0.127.bl.test", 16, t, _reply(t).to_wire()) is None
    loop = bytearray(nx)
    loop[12 + len(q.question):12 + len(q.question) + 2] = b"\xc0" + bytes(
        [12 + len(q.question)])
    assert fast_answer("2.0.0.127.bl.test", 1, q, bytes(loop)) is None


def test_garbage_that_matches_the_question_is_a_temporary_error():
    q = make_query("a.test", dns.rdatatype.A)
    wire = _reply(q).to_wire()[:12 + len(q.question)] + b"\xff" * 7
    wire = wire[:6] + b"\x00\x05" + wire[8:]           # claims five answers
    with pytest.raises(DNSTemporaryError, match="unparsable"):
        decode_reply("a.test", 1, q, wire)


# --- cache ------------------------------------------------------------------------------------

def test_cache_entries_expire_at_their_ttl():
    c = TTLCache(10)
    c.put("k", "v", now=100.0, lifetime=30)
    assert c.get("k", 129.9) == "v"
    assert c.get("k", 130.0) is None and len(c) == 0


def test_cache_is_bounded_and_evicts_least_recently_used():
    c = TTLCache(3)
    for i in range(3):
        c.put(i, i, 0, 100)
    assert c.get(0, 1) == 0          # 0 is now the most recently used
    c.put(3, 3, 1, 100)
    assert len(c) == 3 and c.get(1, 2) is None and c.get(0, 2) == 0 and c.get(3, 2) == 3


def test_cache_ignores_zero_lifetimes():
    c = TTLCache(3)
    c.put("k", "v", 0, 0)
    assert len(c) == 0


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 50)), max_size=200))
def test_cache_never_exceeds_its_bound(ops):
    c = TTLCache(5)
    for key, life in ops:
        c.put(key, key, 0, life)
        assert len(c) <= 5


def _answer(rcode=dns.rcode.NOERROR, records=(), ttl=0, name="a.test", rdtype=1):
    return Answer(name, rdtype, rcode, tuple(records), ttl, name)


def test_cache_lifetime_caps_positive_and_negative_answers():
    a_rec = dns.rrset.from_text("a.test.", 60, "IN", "A", "192.0.2.1")[0]
    assert cache_lifetime(_answer(records=[a_rec], ttl=10 ** 7)) == MAX_CACHE_TTL
    assert cache_lifetime(_answer(records=[a_rec], ttl=300)) == 300
    assert cache_lifetime(_answer(dns.rcode.NXDOMAIN, ttl=10 ** 6)) == MAX_NEGATIVE_TTL
    assert cache_lifetime(_answer(ttl=7200)) == MAX_NEGATIVE_TTL     # NODATA is negative too
    assert cache_lifetime(_answer(dns.rcode.NXDOMAIN, ttl=60)) == 60


# --- MX ---------------------------------------------------------------------------------------

def _mx_answer(*mx, rcode=dns.rcode.NOERROR):
    recs = [dns.rrset.from_text("d.test.", 60, "IN", "MX", m)[0] for m in mx]
    return _answer(rcode, recs, 60, "d.test", dns.rdatatype.MX)


def test_mx_preference_order():
    got = mx_order("d.test", _mx_answer("20 b.test.", "10 a.test.", "30 C.test."), random.Random(1))
    assert got == [(10, "a.test"), (20, "b.test"), (30, "c.test")]


def test_mx_equal_preferences_come_in_random_order():
    ans = _mx_answer("10 a.test.", "10 b.test.", "10 c.test.", "5 first.test.")
    orders = {tuple(h for _, h in mx_order("d.test", ans, random.Random(seed)))
              for seed in range(60)}
    assert all(o[0] == "first.test" for o in orders)
    assert len(orders) == 6          # every permutation of the three equal hosts shows up


def test_no_mx_means_the_domain_itself():
    assert mx_order("d.test", _mx_answer(), random.Random()) == [(0, "d.test")]


def test_null_mx_is_permanent():
    with pytest.raises(DNSPermanentError, match="null MX"):
        mx_order("d.test", _mx_answer("0 ."), random.Random())


def test_null_mx_among_real_ones_is_skipped():
    assert mx_order("d.test", _mx_answer("0 .", "10 a.test."), random.Random()) == [
        (10, "a.test")]


def test_mx_nxdomain_is_permanent():
    with pytest.raises(DNSPermanentError, match="NXDOMAIN"):
        mx_order("d.test", _mx_answer(rcode=dns.rcode.NXDOMAIN), random.Random())


def test_duplicate_mx_targets_are_listed_once():
    assert mx_order("d.test", _mx_answer("10 a.test.", "10 A.test."), random.Random()) == [
        (10, "a.test")]


# --- addresses --------------------------------------------------------------------------------

def _addr(rdtype, *addrs, rcode=dns.rcode.NOERROR):
    t = dns.rdatatype.to_text(rdtype)
    recs = [dns.rrset.from_text("h.test.", 60, "IN", t, a)[0] for a in addrs]
    return _answer(rcode, recs, 60, "h.test", rdtype)


def test_addresses_ipv4_first_then_ipv6():
    assert merge_addresses("h.test", _addr(1, "192.0.2.1"), _addr(28, "2001:db8::1")) == [
        "192.0.2.1", "2001:db8::1"]


def test_one_family_failing_does_not_hide_the_other():
    temp = DNSTemporaryError("h.test", "SERVFAIL")
    assert merge_addresses("h.test", temp, _addr(28, "2001:db8::1")) == ["2001:db8::1"]


def test_addresses_errors():
    temp = DNSTemporaryError("h.test", "timeout")
    with pytest.raises(DNSTemporaryError):
        merge_addresses("h.test", temp, _addr(28))
    with pytest.raises(DNSPermanentError, match="NXDOMAIN"):
        merge_addresses("h.test", _addr(1, rcode=dns.rcode.NXDOMAIN),
                        _addr(28, rcode=dns.rcode.NXDOMAIN))
    with pytest.raises(DNSPermanentError, match="no A or AAAA"):
        merge_addresses("h.test", _addr(1), _addr(28))
