"""Property tests: hostile input to the mail-authentication parsers ends in their documented
outcomes (permerror, neutral, no record), never in another exception."""

from __future__ import annotations

from hypothesis import example, given, settings, strategies as st

from mailappliance.mailauth import dkimverify, dmarc, results, spf
from mailappliance.mailauth.lookup import DNSResult, run_sync
from mailappliance.mailauth.message import split_message

SPF_ALPHABET = st.sampled_from(list("v=spf1 +-~?:/%{}._-0123456789aipmxlsodhcrtvVIncludeexistsredirect"))


@settings(max_examples=300, deadline=None)
@given(st.text(SPF_ALPHABET, max_size=80))
def test_spf_records_parse_or_are_permerror(text):
    record = "v=spf1 " + text
    try:
        spf.parse_record(record)
    except spf._PermError:
        return


@settings(max_examples=200, deadline=None)
@given(st.text(SPF_ALPHABET, max_size=60), st.sampled_from(["192.0.2.1", "2001:db8::1"]))
@example("mx", "192.0.2.1")      # an MX question answered with TXT text (once a ValueError)
@example("ptr", "2001:db8::1")
def test_spf_evaluation_ends_in_a_result_word(text, ip):
    answers = {("x.test", "TXT"): DNSResult("ok", ("v=spf1 " + text,))}
    r = run_sync(spf.check(ip, "a@x.test", "h.test"),
                 lambda q: answers.get((q.name, q.rdtype), DNSResult("ok", ("v=spf1 " + text,))))
    assert r.result in spf.RESULTS
    assert r.lookups <= spf.MAX_DNS_MECHANISMS + 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_strip_forged_keeps_the_body_and_removes_every_claim(header_noise):
    body = b"\r\n\r\nAuthentication-Results: mx.test; body\r\n"
    message = b"Authentication-Results: mx.test; x\r\n" + header_noise.replace(b"\r\n\r\n", b"") \
        + body
    _, body_at = split_message(message)
    cleaned, _ = results.strip_forged(message, "mx.test")
    assert cleaned.endswith(message[body_at:])
    assert split_message(cleaned)[1] == len(cleaned) - (len(message) - body_at)
    again, removed = results.strip_forged(cleaned, "mx.test")
    assert removed == 0 and again == cleaned


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_dkim_signature_fields_never_crash(value):
    message = b"DKIM-Signature: " + value.replace(b"\n", b"\n ") + b"\r\nFrom: a@b.test\r\n\r\nx\r\n"
    sigs = dkimverify.signatures(message)
    keys = {name: DNSResult("ok", ("v=DKIM1; p=",)) for name in dkimverify.key_names(sigs)}
    for r in dkimverify.verify(message, sigs, keys):
        assert r.result in ("pass", "fail", "neutral", "policy", "temperror", "permerror")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_dmarc_records_parse_or_are_refused(text):
    try:
        dmarc.parse_record("v=DMARC1; " + text)
    except dmarc.DMARCSyntaxError:
        pass
