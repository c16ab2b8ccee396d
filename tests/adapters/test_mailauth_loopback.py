"""The Verifier against the real test DNS server on 127.0.0.1 (twisted.names answering, our
dnspython-based resolver asking, real UDP/TCP), serving SPF, DKIM and DMARC records: each SPF
result as documented in docs/MAILAUTH.md, huge and looping records, a silent server, and a
whole message's verdict."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from mailappliance.dns import Resolver
from mailappliance.mailauth import keys
from mailappliance.mailauth.service import Signer, Verifier
from mailappliance.testing.dnsserver import DNSTestServer
from mailappliance.testing.threads import ImmediateThreadPool

CLIENT = "127.0.0.1"
_KEYDIR = Path(tempfile.mkdtemp(prefix="mailauth-keys-"))
RSA = keys.generate(_KEYDIR, "signed.test", "mail", "rsa")
ED = keys.generate(_KEYDIR, "signed.test", "ed", "ed25519")

ZONES = {
    "spf.test": {
        "pass": [["TXT", "v=spf1 ip4:127.0.0.0/8 -all"]],
        "fail": [["TXT", "v=spf1 ip4:192.0.2.1 -all"]],
        "softfail": [["TXT", "v=spf1 ~all"]],
        "neutral": [["TXT", "v=spf1 ?all"]],
        "nospf": [["TXT", "hello"]],
        "permerror": [["TXT", "v=spf1 ip4:127.0.0.1/40 -all"]],
        "temperror": [["TXT", "v=spf1 include:slow.test -all"]],
        "loop": [["TXT", "v=spf1 include:loop.spf.test -all"]],
        "huge": [["TXT", "v=spf1 " + " ".join(f"ip4:10.{i // 250}.{i % 250}.1"
                                              for i in range(500)) + " -all"]],
        "mx": [["TXT", "v=spf1 mx -all"], ["MX", "10 mail.spf.test"]],
        "mail": [["A", "127.0.0.1"]],
    },
    "slow.test": {"@": [["TXT", "v=spf1 +all"]]},
    "signed.test": {
        "@": [["TXT", "v=spf1 -all"]],
        "mail._domainkey": [["TXT", RSA.txt_record()]],
        "ed._domainkey": [["TXT", ED.txt_record()]],
        "_dmarc": [["TXT", "v=DMARC1; p=reject; adkim=s"]],
    },
}


class LoopbackVerifier(unittest.TestCase):
    def setUp(self):
        self.server = DNSTestServer(ZONES, reactor)
        self.address = self.server.start()
        self.addCleanup(self.server.stop)
        self.server.set_behaviour(mode="drop", zone="slow.test")
        self.resolver = Resolver(reactor, [self.address], attempt_timeout=0.5, attempts=1)
        self.addCleanup(self.resolver.close)
        self.pool = ImmediateThreadPool()

    def verifier(self, **kw):
        return Verifier(self.resolver, reactor, self.pool, "mx.test", **kw)

    async def test_each_spf_result(self):
        v = self.verifier()
        expected = {"pass": "pass", "fail": "fail", "softfail": "softfail",
                    "neutral": "neutral", "nospf": "none", "nxdomain": "none",
                    "permerror": "permerror", "temperror": "temperror", "loop": "permerror",
                    "huge": "permerror", "mx": "pass"}
        got = {}
        for name in expected:
            r = await v.check_spf(CLIENT, "client.test", f"someone@{name}.spf.test")
            got[name] = r.result
        self.assertEqual(got, expected)
        self.assertGreater(self.server.count("huge.spf.test", "TXT"), 0)   # over TCP
        # The looping include asked its record once, then the answers came from the cache.
        self.assertEqual(self.server.count("loop.spf.test", "TXT"), 1)

    async def test_only_fail_is_refused_under_enforce(self):
        v = self.verifier(spf="enforce")
        for name, refused in (("fail", True), ("softfail", False), ("temperror", False),
                              ("permerror", False), ("nospf", False)):
            r = await v.check_spf(CLIENT, "client.test", f"a@{name}.spf.test")
            reply = v.spf_refusal(r, CLIENT)
            self.assertEqual(reply is not None, refused, name)
            if refused:
                self.assertEqual((reply.code, reply.enhanced), (550, "5.7.23"))

    async def test_silent_server_is_a_temperror_after_the_resolver_timeout(self):
        start = reactor.seconds()
        r = await self.verifier().check_spf(CLIENT, "h", "a@temperror.spf.test")
        self.assertEqual(r.result, "temperror")
        self.assertLess(reactor.seconds() - start, 5)

    async def test_signed_message_verdicts(self):
        registry = keys.KeyRegistry(_KEYDIR)
        signer = Signer(registry, reactor, self.pool)
        message = (b"From: a@signed.test\r\nTo: u@mx.test\r\nSubject: s\r\n"
                   b"Authentication-Results: mx.test; dkim=pass\r\n\r\nbody\r\n")
        fields = await signer.sign(message, "a@signed.test")
        v = self.verifier()
        spf = await v.check_spf(CLIENT, "h", "a@signed.test")
        self.assertEqual(spf.result, "fail")                       # -all, but DKIM aligns
        verdict = await v.check_message(fields + message, spf)
        self.assertEqual([r.result for r in verdict.dkim], ["pass", "pass"])
        self.assertEqual((verdict.dmarc.result, verdict.action), ("pass", "accept"))
        out = verdict.apply(fields + message)
        self.assertEqual(out.count(b"Authentication-Results:"), 1)
        # Altered in transit: both signatures fail, p=reject refuses.
        verdict = await v.check_message((fields + message).replace(b"body", b"BODY"), spf)
        self.assertEqual([r.result for r in verdict.dkim], ["fail", "fail"])
        self.assertEqual(verdict.action, "reject")
        self.assertEqual(verdict.reply.code, 550)
        self.assertIn("DMARC", verdict.reply.text)

    async def test_lookups_are_cached_for_their_ttl_across_messages(self):
        """Every lookup goes through the product's resolver, so a second message of the same
        domain asks the DNS server nothing: SPF's TXT, the DKIM key and the DMARC record are
        each asked once (the zone's TTL is 300 s)."""
        signer = Signer(keys.KeyRegistry(_KEYDIR), reactor, self.pool)
        message = b"From: a@signed.test\r\nTo: u@mx.test\r\nSubject: s\r\n\r\nbody\r\n"
        signed = await signer.sign(message, "a@signed.test") + message
        v = self.verifier()
        for _ in range(3):
            spf = await v.check_spf(CLIENT, "h", "a@signed.test")
            verdict = await v.check_message(signed, spf)
            self.assertEqual(verdict.dmarc.result, "pass")
        self.assertEqual(self.server.count("signed.test", "TXT"), 1)
        self.assertEqual(self.server.count("mail._domainkey.signed.test", "TXT"), 1)
        self.assertEqual(self.server.count("ed._domainkey.signed.test", "TXT"), 1)
        self.assertEqual(self.server.count("_dmarc.signed.test", "TXT"), 1)
