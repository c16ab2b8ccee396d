"""Verifier and Signer, the adapters the SMTP side calls, with a FakeResolver, a Clock and a
synchronous thread pool: whole messages get their verdicts; DNS that never answers costs the
deadline and ends as temperror without refusing; keys appear without restart."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailappliance.mailauth import keys
from mailappliance.mailauth.service import (INLINE_BYTES, MESSAGE_DNS_TIMEOUT, ISigner,
                                            IVerifier, Signer, Verifier)
from mailappliance.testing.mailauth import FakeSigner, FakeVerifier
from mailappliance.testing.resolver import FakeResolver
from mailappliance.testing.threads import ImmediateThreadPool, ThreadlessReactor

CLIENT = "192.0.2.10"


def body(from_addr: str, extra: bytes = b"") -> bytes:
    return (extra + f"From: <{from_addr}>\r\nTo: user@mx.test\r\nSubject: hi\r\n"
            f"Message-ID: <1@x>\r\n\r\nhello\r\n".encode())


@pytest.fixture
def env(tmp_path):
    data = tmp_path
    ed = keys.generate(data, "signed.test", "ed", "ed25519")
    rsa_key = keys.generate(data, "signed.test", "mail", "rsa")
    zones = {
        "signed.test": {"@": [["TXT", f"v=spf1 ip4:{CLIENT} -all"]],
                        "ed._domainkey": [["TXT", ed.txt_record()]],
                        "mail._domainkey": [["TXT", rsa_key.txt_record()]],
                        "_dmarc": [["TXT", "v=DMARC1; p=reject"]]},
        "reject.test": {"@": [["TXT", "v=spf1 -all"]], "_dmarc": [["TXT", "v=DMARC1; p=reject"]]},
        "quar.test": {"_dmarc": [["TXT", "v=DMARC1; p=quarantine"]]},
        "plain.test": {"@": [["TXT", "v=spf1 ~all"]]},
    }
    resolver = FakeResolver(zones)
    clock = ThreadlessReactor()
    pool = ImmediateThreadPool()
    signer = Signer(keys.KeyRegistry(data), clock, pool, clock=lambda: 1_700_000_000)

    def verifier(**modes):
        return Verifier(resolver, clock, pool, "mx.test", **modes)

    return resolver, clock, signer, verifier, data


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


def test_interfaces():
    verifyObject(IVerifier, FakeVerifier())
    verifyObject(ISigner, FakeSigner())
    verifyObject(IVerifier, Verifier(FakeResolver({}), Clock(), ImmediateThreadPool(), "mx"))
    verifyObject(ISigner, Signer(keys.KeyRegistry("/nonexistent"), Clock(),
                                 ImmediateThreadPool()))


def test_signed_mail_passes_dkim_spf_and_dmarc(env):
    resolver, clock, signer, verifier, _ = env
    message = body("a@signed.test")
    fields = result_of(signer.sign(message, "a@signed.test"))
    assert fields.count(b"DKIM-Signature:") == 2
    v = verifier()
    spf = result_of(v.check_spf(CLIENT, "client.example", "a@signed.test"))
    assert spf.result == "pass" and v.spf_refusal(spf, CLIENT) is None
    verdict = result_of(v.check_message(fields + message, spf))
    assert verdict.action == "accept"
    assert [r.result for r in verdict.dkim] == ["pass", "pass"]
    assert verdict.dmarc.result == "pass"
    header = verdict.headers().decode()
    assert header.startswith("Authentication-Results: mx.test;")
    assert "spf=pass" in header and "dmarc=pass" in header and header.count("dkim=pass") == 2


def test_dmarc_reject_refuses_with_550_naming_dmarc(env):
    _, _, _, verifier, _ = env
    v = verifier()
    spf = result_of(v.check_spf("198.51.100.1", "h.example", "a@reject.test"))
    assert spf.result == "fail"
    assert v.spf_refusal(spf, "198.51.100.1") is None           # spf = "tag"
    verdict = result_of(v.check_message(body("a@reject.test"), spf))
    assert verdict.action == "reject"
    assert (verdict.reply.code, verdict.reply.enhanced) == (550, "5.7.1")
    assert "DMARC" in verdict.reply.text


def test_spf_enforce_refuses_fail_at_mail_from(env):
    _, _, _, verifier, _ = env
    v = verifier(spf="enforce")
    spf = result_of(v.check_spf("198.51.100.1", "h.example", "a@reject.test"))
    reply = v.spf_refusal(spf, "198.51.100.1")
    assert (reply.code, reply.enhanced) == (550, "5.7.23")
    soft = result_of(v.check_spf("198.51.100.1", "h.example", "a@plain.test"))
    assert soft.result == "softfail" and v.spf_refusal(soft, "198.51.100.1") is None


def test_altered_signed_mail_fails_dkim_and_dmarc(env):
    _, _, signer, verifier, _ = env
    message = body("a@signed.test")
    signed = result_of(signer.sign(message, "a@signed.test")) + message
    v = verifier()
    verdict = result_of(v.check_message(signed.replace(b"hello", b"HELLO"), None))
    assert {r.result for r in verdict.dkim} == {"fail"}
    assert verdict.action == "reject"


def test_quarantine_marks_and_tag_mode_only_tags(env):
    _, _, _, verifier, _ = env
    verdict = result_of(verifier().check_message(body("a@quar.test"), None))
    assert verdict.action == "quarantine" and b"X-Spam-Flag: YES" in verdict.headers()
    verdict = result_of(verifier(dmarc="tag").check_message(body("a@reject.test"), None))
    assert verdict.action == "accept" and "dmarc=fail" in verdict.headers().decode()


def test_off_makes_no_lookups(env):
    resolver, _, _, verifier, _ = env
    v = verifier(spf="off", dkim="off", dmarc="off")
    assert result_of(v.check_spf(CLIENT, "h", "a@signed.test")) is None
    verdict = result_of(v.check_message(body("a@reject.test"), None))
    assert verdict.action == "accept" and resolver.queries == []


def test_silent_dns_is_temperror_and_never_refuses(env):
    resolver, clock, signer, verifier, _ = env
    resolver.fail("reject.test", "hang")
    v = verifier(spf="enforce")
    d = v.check_message(body("a@reject.test"), None)
    out = []
    d.addBoth(out.append)
    clock.advance(MESSAGE_DNS_TIMEOUT - 1)
    assert out == []
    clock.advance(2)
    verdict = out[0]
    assert verdict.action == "accept" and verdict.dmarc.result == "temperror"
    assert clock.getDelayedCalls() == []
    d = v.check_spf("198.51.100.1", "h", "a@reject.test")
    spf = []
    d.addBoth(spf.append)
    clock.advance(30)
    assert spf[0].result == "temperror" and v.spf_refusal(spf[0], "198.51.100.1") is None


def test_forged_authentication_results_is_removed_by_apply(env):
    _, _, _, verifier, _ = env
    message = body("a@plain.test", b"Authentication-Results: MX.TEST; dmarc=pass\r\n"
                                   b"Authentication-Results: other.example; spf=pass\r\n")
    verdict = result_of(verifier().check_message(message, None))
    out = verdict.apply(message)
    assert out.count(b"Authentication-Results: mx.test;") == 1
    assert b"MX.TEST; dmarc=pass" not in out and b"other.example; spf=pass" in out
    # A folded one is found too; a message without any is not searched again.
    folded = body("a@plain.test", b"Authentication-Results:\r\n mx.test; dkim=pass\r\n")
    verdict = result_of(verifier().check_message(folded, None))
    assert verdict.strip and b"dkim=pass" not in verdict.apply(folded)
    clean = body("a@plain.test")
    verdict = result_of(verifier().check_message(clean, None))
    assert not verdict.strip and verdict.apply(clean) == verdict.headers() + clean


def test_signer_sees_a_new_key_without_restart_and_skips_foreign_domains(env):
    _, _, signer, _, data = env
    message = body("a@new.test")
    assert result_of(signer.sign(message, "a@new.test")) == b""
    keys.generate(data, "new.test", "mail", "ed25519")
    fields = result_of(signer.sign(message, "a@new.test"))
    assert b"d=new.test" in fields and b"s=mail" in fields
    # The From: domain has no key, the envelope sender's has.
    assert b"d=signed.test" in result_of(signer.sign(body("x@foreign.test"), "b@signed.test"))


def test_unix_socket_client_has_no_spf(env):
    _, _, _, verifier, _ = env
    assert result_of(verifier().check_spf("", "h", "a@signed.test")) is None


def test_fit_and_sign_re_encodes_long_lines_first_and_signs_what_will_be_sent(env):
    """Issue 18 (wire): the signature is made over the re-encoded message, so it verifies on
    the bytes that are queued and sent; a message without a long line is not copied."""
    _, _, signer, verifier, _ = env
    message = body("a@signed.test").replace(b"hello", b"x" * 70_000)
    fields, fitted = result_of(signer.fit_and_sign(message, "a@signed.test"))
    assert fitted != message and max(map(len, fitted.splitlines())) <= 76
    verdict = result_of(verifier().check_message(fields + fitted, None))
    assert [r.result for r in verdict.dkim] == ["pass", "pass"]
    short = body("a@signed.test")
    fields, same = result_of(signer.fit_and_sign(short, "a@signed.test"))
    assert same is short and fields.count(b"DKIM-Signature:") == 2


def test_small_messages_are_signed_and_verified_on_the_reactor_large_ones_in_the_pool(env):
    """INLINE_BYTES: a small message's signature and verification cost less on the reactor
    than a trip to the pool; a large message, a third signature, or a key directory that
    changed (files to read) go to the pool."""
    resolver, clock, _signer, verifier, data = env
    registry = keys.KeyRegistry(data, clock=lambda: 1e12)   # far from every mtime: no "racy"
    pool = ImmediateThreadPool()
    signer = Signer(registry, clock, pool, clock=lambda: 1_700_000_000)
    small = body("a@signed.test")
    assert result_of(signer.sign(small, "a@signed.test")).count(b"DKIM-Signature:") == 2
    assert pool.calls == 1                       # the first look reads data/dkim: in the pool
    fields = result_of(signer.sign(small, "a@signed.test"))
    assert fields.count(b"DKIM-Signature:") == 2 and pool.calls == 1      # keys current: inline
    fields, same = result_of(signer.fit_and_sign(small, "a@signed.test"))  # what SignCheck calls
    assert same is small and fields.count(b"DKIM-Signature:") == 2 and pool.calls == 1
    large = small + b"x" * INLINE_BYTES + b"\r\n"
    assert result_of(signer.sign(large, "a@signed.test")).count(b"DKIM-Signature:") == 2
    assert pool.calls == 2
    keys.generate(data, "signed.test", "third", "ed25519")     # the directory changed
    assert result_of(signer.sign(small, "a@signed.test")).count(b"DKIM-Signature:") == 3
    assert pool.calls == 3

    v = Verifier(resolver, clock, pool, "mx.test")
    one = signer.sign_now(small, "a@signed.test")
    spf = result_of(v.check_spf(CLIENT, "h", "a@signed.test"))
    verdict = result_of(v.check_message(one + small, spf))
    assert [r.result for r in verdict.dkim] == ["pass", "pass", "permerror"]   # s=third: no record
    assert pool.calls == 4                       # three signatures: more than INLINE_SIGNATURES
    two = b"".join(f for f in _fields(one) if b"s=third" not in f)
    verdict = result_of(v.check_message(two + small, spf))
    assert [r.result for r in verdict.dkim] == ["pass", "pass"] and pool.calls == 4   # inline
    verdict = result_of(v.check_message(signer.sign_now(large, "a@signed.test") + large, spf))
    assert pool.calls == 5                       # large: in the pool


def _fields(fields: bytes) -> list[bytes]:
    """Header fields one by one (continuation lines kept with their field)."""
    out: list[bytes] = []
    for line in fields.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line
        else:
            out.append(line)
    return out
