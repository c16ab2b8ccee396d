"""Mail authentication in the SMTP session: SPF at MAIL FROM, the end-of-DATA checks
(mailappliance/enddata.py) with the verifier and the signer, through the real protocol, the
real App and the real queue (World of test_smtp_protocol), with the verifier and signer fakes
of mailappliance/testing/mailauth.py so each outcome and each pending Deferred is the test's."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.logger import capturedLogs, formatEvent

from mailappliance import enddata
from mailappliance.config import DKIMSettings, SubmissionSettings, VerifySettings
from mailappliance.mailauth.service import SignCheck, VerifyCheck
from mailappliance.mailauth.spf import SPFResult
from mailappliance.queue.inject import MessageWriter
from mailappliance.smtp.replies import Reply
from mailappliance.testing.mailauth import FakeSigner, FakeVerifier
from mailappliance.testing.threads import DeferredThreadPool

from tests.adapters.test_smtp_protocol import HOST, World, codes

SIG = b"DKIM-Signature: v=1; a=rsa-sha256; d=test.com; s=mail; b=fake\n"
FORGED = b"Authentication-Results: MX.TEST.COM; dmarc=pass header.from=paypal.example\n"
OTHER = b"Authentication-Results: other.example; spf=pass\n"
MESSAGE = b"From: bob@remote.example\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"
SPF_FAIL = SPFResult("fail", "mailfrom", "remote.example", "bob@remote.example", "-all")
SPF_PASS = SPFResult("pass", "mailfrom", "remote.example", "bob@remote.example", "ip4")


def crlf(text: bytes) -> bytes:
    return text.replace(b"\n", b"\r\n")


def world(tmp_path, verifier=None, signer=None, sign=True, **kw) -> World:
    """World whose App uses the fakes for its verifier and its end-of-DATA checks."""
    w = World(tmp_path, **kw)
    w.verifier = verifier or FakeVerifier(SPF_PASS, hostname=HOST)
    w.signer = signer or FakeSigner(SIG)
    w.app.verifier = w.verifier
    w.sign = sign
    w.app.end_of_data = [VerifyCheck(w.verifier), SignCheck(w.signer, lambda: w.sign)]
    return w


def session(w, ip="127.0.0.5", helo=b"EHLO client.example\r\n"):
    c = w.connect(ip)
    c.take()
    c.chat(helo)
    return c


def test_internet_client_spf_at_mail_from_and_header_on_top_forged_one_removed(tmp_path):
    w = world(tmp_path)
    c = session(w)
    assert codes(c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\n"
                        b"DATA\r\n")) == [250, 250, 354]
    assert w.verifier.spf_calls == [("127.0.0.5", "client.example", "bob@remote.example")]
    reply = c.chat(crlf(FORGED + OTHER) + MESSAGE)
    assert codes(reply) == [250]
    ((_sender, _rcpts, stored),) = w.queued()
    assert stored.startswith(b"Authentication-Results: mx.test.com;")
    assert FORGED not in stored and OTHER in stored
    # What the verifier saw: the message as it would be queued, our Received: on top.
    (seen,) = w.verifier.messages
    assert seen.startswith(b"Received: from unknown (HELO client.example) (127.0.0.5)")
    assert FORGED in seen
    assert w.signer.calls == []                        # mail from the internet: never signed


def test_spf_enforce_refuses_mail_from_and_the_transaction_never_starts(tmp_path):
    w = world(tmp_path, FakeVerifier(SPF_FAIL, spf_mode="enforce", hostname=HOST))
    c = session(w)
    out = c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\n")
    first = out.split("\r\n")[0]
    assert first.startswith("550 5.7.23 SPF fail: 127.0.0.5 is not allowed to send mail for "
                            "remote.example")
    assert codes(out) == [550, 503]


def test_spf_tag_records_the_fail_and_accepts(tmp_path):
    w = world(tmp_path, FakeVerifier(SPF_FAIL, spf_mode="tag", hostname=HOST))
    c = session(w)
    assert codes(c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\n"
                        b"DATA\r\n" + MESSAGE)) == [250, 250, 354, 250]
    ((_s, _r, stored),) = w.queued()
    assert b"spf=fail" in stored.split(b"\n\n")[0]


def test_null_sender_passes_helo_for_the_helo_identity(tmp_path):
    w = world(tmp_path)
    c = session(w, helo=b"HELO bounce.remote.example\r\n")
    c.chat(b"MAIL FROM:<>\r\n")
    assert w.verifier.spf_calls == [("127.0.0.5", "bounce.remote.example", "")]


def test_dmarc_reject_is_550_after_the_dot_and_nothing_is_queued(tmp_path):
    w = world(tmp_path, FakeVerifier(SPF_PASS, action="reject", hostname=HOST))
    c = session(w)
    out = c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\n"
                 + MESSAGE)
    assert codes(out) == [250, 250, 354, 550]
    assert "550 5.7.1 message refused by the DMARC policy of example.test" in out
    assert w.queued() == []
    # The session goes on: the next transaction is checked afresh.
    w.verifier.action = "accept"
    assert codes(c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\n"
                        b"DATA\r\n" + MESSAGE)) == [250, 250, 354, 250]
    assert len(w.queued()) == 1


def test_quarantine_is_delivered_marked(tmp_path):
    w = world(tmp_path, FakeVerifier(SPF_PASS, action="quarantine", hostname=HOST))
    c = session(w)
    c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\n" + MESSAGE)
    ((_s, _r, stored),) = w.queued()
    head = stored.split(b"\n\n")[0]
    assert b"\nX-Spam-Flag: YES\n" in head
    assert b"X-Mailappliance-Quarantine: DMARC policy of example.test is quarantine" in head
    assert b"Subject: hi" in head


def test_pending_checks_keep_pipelined_replies_in_order_and_other_sessions_go_on(tmp_path):
    w = world(tmp_path, FakeVerifier(SPF_PASS, hold=True, hostname=HOST))
    c = session(w)
    c.send(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\n")
    assert c.take() == ""                              # MAIL waits for SPF: nothing answered
    other = w.connect("127.0.0.6")                     # another session is not held up
    assert other.take().startswith("220 ")
    assert codes(other.chat(b"HELO x\r\nNOOP\r\n")) == [250, 250]
    spf = w.verifier.pending.pop(0)
    spf.callback(spf.value)
    assert codes(c.take()) == [250, 250, 354]          # in command order
    c.send(MESSAGE + b"NOOP\r\nMAIL FROM:<bob@remote.example>\r\n")
    assert c.take() == ""                              # the dot waits for the checks
    assert w.queued() == []
    check = w.verifier.pending.pop(0)
    check.callback(check.value)
    out = c.take()
    assert codes(out) == [250, 250]                    # the dot's 250, then NOOP's
    assert out.startswith("250 2.0.0 ok ")
    assert len(w.queued()) == 1
    spf = w.verifier.pending.pop(0)                    # the next MAIL's SPF, pipelined
    spf.callback(spf.value)
    assert codes(c.take()) == [250]


def test_client_gone_while_checks_run_gets_nothing_queued(tmp_path):
    w = world(tmp_path, FakeVerifier(SPF_PASS, hold=True, hostname=HOST))
    c = session(w)
    c.send(b"MAIL FROM:<bob@remote.example>\r\n")
    spf = w.verifier.pending.pop(0)
    spf.callback(spf.value)
    c.chat(b"RCPT TO:<alice@test.com>\r\nDATA\r\n" + MESSAGE)
    check = w.verifier.pending.pop(0)
    signed = []
    w.signer.fit_and_sign = lambda *a, **kw: signed.append(a)
    with capturedLogs() as events:
        c.lose()
    # The check in progress is cancelled (a scanner's connection closed, a DNS question
    # dropped), the ones after it never run, nothing is queued, one line says so.
    assert check.called                     # fired by cancel(): the test never fired it
    check.callback(check.value)             # a verdict after all is ignored (Twisted's cancel)
    assert signed == []
    assert w.queued() == []
    lines = [formatEvent(e) for e in events]
    assert ("client gone during the end-of-data checks: rip=127.0.0.5; checks stopped, "
            "nothing queued") in lines
    assert not any("failed" in line for line in lines), lines


def test_a_failing_check_is_451_and_nothing_is_queued(tmp_path):
    w = world(tmp_path, FakeVerifier(SPF_PASS, action="fail", hostname=HOST))
    c = session(w)
    out = c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\n"
                 + MESSAGE)
    assert codes(out) == [250, 250, 354, 451]
    assert w.queued() == []


def test_relayclient_is_not_verified_and_is_signed_once_on_top(tmp_path):
    w = world(tmp_path, rules='127.0.0.5:allow,RELAYCLIENT=""\n')
    c = session(w)
    assert codes(c.chat(b"MAIL FROM:<alice@test.com>\r\nRCPT TO:<x@remote.example>\r\n"
                        b"DATA\r\n" + crlf(FORGED) + MESSAGE)) == [250, 250, 354, 250]
    assert w.verifier.spf_calls == [] and w.verifier.messages == []
    ((_s, _r, stored),) = w.queued()
    assert stored.startswith(SIG + b"Received: from unknown (HELO client.example)")
    assert stored.count(b"DKIM-Signature:") == 1
    assert FORGED in stored                            # not ours to judge: left alone
    ((signed, mail_from),) = w.signer.calls
    assert mail_from == "alice@test.com" and signed == stored[len(SIG):]


def test_our_users_long_line_is_queued_re_encoded_under_the_signature(tmp_path):
    """The signing check re-encodes a line over RFC 5321's limit before signing: the queue
    holds (and every attempt sends) the bytes the signature covers."""
    w = world(tmp_path, rules='127.0.0.5:allow,RELAYCLIENT=""\n')
    c = session(w)
    long_message = b"From: alice@test.com\r\nSubject: s\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n"
    assert codes(c.chat(b"MAIL FROM:<alice@test.com>\r\nRCPT TO:<x@remote.example>\r\n"
                        b"DATA\r\n" + long_message)) == [250, 250, 354, 250]
    ((_s, _r, stored),) = w.queued()
    assert max(map(len, stored.splitlines())) <= 998
    assert b"\nContent-Transfer-Encoding: quoted-printable\n" in stored
    ((signed, _mail_from),) = w.signer.calls
    assert stored == SIG + signed                     # signed what is queued


def test_roaming_grant_is_trusted_too(tmp_path):
    w = world(tmp_path)
    w.app.grants.grant("127.0.0.9", 60)
    c = session(w, ip="127.0.0.9")
    c.chat(b"MAIL FROM:<alice@test.com>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\n" + MESSAGE)
    assert w.verifier.spf_calls == [] and len(w.signer.calls) == 1


def test_authenticated_submission_is_signed_not_verified(tmp_path):
    from tests.adapters.test_smtp_auth import GOOD_PLAIN, Sub
    w = Sub(tmp_path, tls=False,
            submission_settings=SubmissionSettings(auth_plaintext_loopback=True))
    verifier, signer = FakeVerifier(SPF_PASS, hostname=HOST), FakeSigner(SIG)
    w.app.verifier = verifier
    w.app.end_of_data = [VerifyCheck(verifier), SignCheck(signer, lambda: True)]
    c = w.connect("127.0.0.5")
    c.take()
    c.chat(b"EHLO c\r\n")
    assert c.chat(f"AUTH PLAIN {GOOD_PLAIN}\r\n".encode())[:3] == "235"
    out = c.chat(b"MAIL FROM:<alice@test.com>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\n"
                 b"From: alice@test.com\r\nSubject: s\r\n\r\nb\r\n.\r\n")
    assert codes(out) == [250, 250, 354, 250]
    assert verifier.spf_calls == [] and verifier.messages == []
    ((_s, _r, stored),) = w.queued()
    assert stored.startswith(SIG)


def test_signing_off_leaves_our_users_mail_streaming_unsigned(tmp_path):
    w = world(tmp_path, sign=False, rules='127.0.0.5:allow,RELAYCLIENT=""\n')
    c = session(w)
    c.chat(b"MAIL FROM:<alice@test.com>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\n")
    assert isinstance(c.proto._writer, MessageWriter)      # nothing wants the message: streamed
    c.chat(MESSAGE)
    assert w.signer.calls == []
    ((_s, _r, stored),) = w.queued()
    assert stored.startswith(b"Received:")


def test_held_while_checks_are_due_and_pool_writes_wait_for_the_commit(tmp_path):
    pool = DeferredThreadPool()
    w = world(tmp_path, pool=pool)
    c = session(w)
    c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\n")
    assert isinstance(c.proto._writer, enddata.HeldMessage)
    big = b"x" * 200 + b"\r\n"
    c.send(b"Subject: big\r\n\r\n" + big * 1000)       # 200 KB: nothing goes to the pool yet
    assert pool.pending == type(pool.pending)()
    c.send(b".\r\n")
    assert c.take() == ""
    pool.run_all()
    assert codes(c.take()) == [250]
    ((_s, _r, stored),) = w.queued()
    assert stored.count(b"x" * 200) == 1000


def test_real_app_builds_the_checks_in_order_and_follows_verify_reload(tmp_path):
    w = World(tmp_path, fields={"verify": VerifySettings(), "dkim": DKIMSettings()})
    names = [c.name for c in w.app.end_of_data]
    assert names == ["mailauth", "scan", "dkim-sign"]      # scan: [scan] (off here, wants nothing)
    assert (w.app.verifier.spf_mode, w.app.verifier.dmarc_mode) == ("tag", "enforce")
    new = dataclasses.replace(w.app.settings, verify=VerifySettings("enforce", "off", "tag"))
    w.app.reload(new)
    v = w.app.verifier
    assert (v.spf_mode, v.dkim_mode, v.dmarc_mode) == ("enforce", "off", "tag")
    new = dataclasses.replace(new, verify=VerifySettings("off", "off", "off"))
    w.app.reload(new)
    assert not w.app.verifier.active
    c = session(w)
    c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\nDATA\r\n")
    assert isinstance(c.proto._writer, MessageWriter)      # all off: nothing held, no lookups


def test_run_checks_threads_the_message_and_stops_at_the_first_refusal():
    tx = enddata.Transaction("a@b.example", ("c@d.example",), "192.0.2.1", "h", "smtp",
                             False, False)

    class Step:
        def __init__(self, name, outcome):
            self.name, self.outcome, self.seen = name, outcome, None

        def wants(self, tx):
            return True

        def check(self, tx, message):
            self.seen = message
            return self.outcome

    add = Step("add", enddata.accept(headers=b"X-A: 1\n", note="added"))
    swap = Step("swap", enddata.accept(message=b"new\n"))
    stop = Step("stop", enddata.tempfail(Reply(451, "4.7.1", "later")))
    never = Step("never", enddata.accept())
    results = []
    enddata.run_checks([add, swap, stop, never], tx, b"old\n").addCallback(results.append)
    (r,) = results
    assert (add.seen, swap.seen, stop.seen, never.seen) == (b"old\n", b"X-A: 1\nold\n",
                                                            b"new\n", None)
    assert r.reply.code == 451 and r.notes == ["added"]
    results.clear()
    enddata.run_checks([add, swap], tx, b"old\n").addCallback(results.append)
    assert results[0].message == b"new\n" and results[0].reply is None
    with pytest.raises(ValueError):
        enddata.refuse(Reply(451, "4.3.0", "not permanent"))
