"""Mail authentication through the real server (twistd on loopback), against the loopback DNS
server serving SPF, DKIM and DMARC records, with Postfix's smtp-sink as the next hop and
OpenDKIM's library as the independent verifier of what arrives there.

One server for the module: hostname mx.test.example, local domains signed.test (an RSA key)
and ed.test (an Ed25519 key), [verify] spf = "enforce", dmarc = "enforce"; clients from
127.0.0.2 are RELAYCLIENT (the rules file), clients from 127.0.0.1 on port 25 are "the
internet", submission users log in (AUTH PLAIN in clear from loopback)."""

from __future__ import annotations

import smtplib

import pytest

from mailappliance.mailauth import keys
from mailappliance.mailauth.keys import KeyRegistry
from mailappliance.mailauth.service import Signer
from mailappliance.testing.dnsserver import DNSServerProcess
from tests.integration.delivery_support import SmtpSink, maildir_files, wait_until
from tests.integration.opendkim import OpenDKIM
from tests.integration.server import ServerProcess
from tests.integration.test_mailauth_opendkim import record_of

HOST = "mx.test.example"
PASSWORD = "Passw0rd!"
ZONES_STATIC = {
    # an outside domain that sends from nowhere: SPF -all, DMARC p=reject
    "strict.example": {"@": [["TXT", "v=spf1 -all"]],
                       "_dmarc": [["TXT", "v=DMARC1; p=reject"]]},
    # an outside domain whose SPF says nothing (?all): MAIL FROM passes, DMARC rests on From:
    "neutral.example": {"@": [["TXT", "v=spf1 ?all"]]},
    # an outside domain that allows 127.0.0.1
    "passing.example": {"@": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
                        "_dmarc": [["TXT", "v=DMARC1; p=reject"]]},
    "quarantine.example": {"@": [["TXT", "v=spf1 -all"]],
                           "_dmarc": [["TXT", "v=DMARC1; p=quarantine"]]},
}


def txt(key) -> str:
    return key.txt_record()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mailauth")
    data = root / "server" / "var"
    data.mkdir(parents=True)
    rsa = keys.generate(data, "signed.test", "mail", "rsa")
    ed = keys.generate(data, "ed.test", "ed", "ed25519")
    (data / "dkim" / "broken._domainkey.signed.test.pem").write_text("not a key\n")
    zones = dict(ZONES_STATIC)
    zones["signed.test"] = {"mail._domainkey": [["TXT", txt(rsa)]],
                            "@": [["TXT", "v=spf1 -all"]],
                            "_dmarc": [["TXT", "v=DMARC1; p=reject"]]}
    zones["ed.test"] = {"ed._domainkey": [["TXT", txt(ed)]],
                        "@": [["TXT", "v=spf1 -all"]],
                        "_dmarc": [["TXT", "v=DMARC1; p=reject"]]}
    rules = root / "tcp.smtp"
    rules.write_text('127.0.0.2:allow,RELAYCLIENT=""\n:allow\n')
    with DNSServerProcess(zones) as dns:
        sink = SmtpSink(root / "sink").start()
        srv = ServerProcess(root / "server", hostname=HOST, config=(
            f'default_domain = "signed.test"\n'
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
            f'[verify]\nspf = "enforce"\ndkim = "tag"\ndmarc = "enforce"\n'
            f'[smtp]\nrules = "{rules}"\n'
            f'[submission]\nauth_plaintext_loopback = true\n'
            f'[routes]\n"remote.test" = "127.0.0.1:{sink.port}"\n'))
        srv.root.mkdir(parents=True, exist_ok=True)
        srv._write_config()
        for domain in ("signed.test", "ed.test"):
            srv.cli("domain", "add", domain)
        srv.cli("user", "add", "test@signed.test", "--password-stdin", input=PASSWORD + "\n")
        srv.cli("user", "add", "alice@ed.test", "--password-stdin", input=PASSWORD + "\n")
        srv.start()
        verifier = OpenDKIM((dns.host, dns.port))
        try:
            yield srv, dns, sink, verifier, rsa
        finally:
            verifier.close()
            srv.stop()
            sink.close()


def smtp(srv, source="127.0.0.1", kind="smtp") -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", srv.port(kind), source_address=(source, 0), timeout=30)
    s.ehlo("client.example")
    return s


def at_sink(sink, subject: bytes):
    found = wait_until(lambda: [t for t in sink.transactions() if subject in t.body],
                       what=f"{subject!r} at the sink")
    assert len(found) == 1
    return found[0]


def delivered(srv, subject: bytes, address="test@signed.test") -> bytes:
    (path,) = wait_until(lambda: [p for p in maildir_files(srv, address)
                                  if subject in p.read_bytes()], what=f"{subject!r} delivered")
    return path.read_bytes()


def header(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


def test_unusable_key_file_is_one_line_at_start_and_the_server_runs(world):
    srv = world[0]
    lines = [l for l in srv.stdout().splitlines() if "broken._domainkey.signed.test.pem" in l]
    assert len(lines) == 1, srv.stdout()
    assert "unusable key file" in lines[0] and "not a PEM private key" in lines[0]
    # `mailappliance check` says the same, in one line, and fails.
    res = srv.cli("check", check=False)
    assert res.returncode == 1
    dkim_lines = [l for l in res.stderr.splitlines() if "dkim" in l]
    assert dkim_lines == [f"mailappliance: dkim: unusable key file, not signing with it: "
                          f"{srv.data}/dkim/broken._domainkey.signed.test.pem: not a PEM "
                          f"private key"], res.stderr
    assert dkim_lines[0].split("not signing with it: ")[1] in lines[0]


def test_relayclient_mail_reaches_the_sink_with_one_signature_opendkim_passes(world):
    srv, dns, sink, opendkim, _rsa = world
    with smtp(srv, source="127.0.0.2") as s:
        s.sendmail("alice@signed.test", ["bob@remote.test"],
                   b"From: Alice <alice@signed.test>\r\nTo: bob@remote.test\r\n"
                   b"Subject: relayed-rsa\r\n\r\nQuarterly numbers.  \r\n")
    t = at_sink(sink, b"relayed-rsa")
    assert header(t.body).count(b"DKIM-Signature:") == 1
    assert b"Authentication-Results" not in t.body          # our own client: not verified
    checks = opendkim.verify(t.body)
    assert [(c.domain, c.selector, c.passed) for c in checks] == \
        [("signed.test", "mail", True)], checks


def test_submission_user_is_signed_with_ed25519_and_never_verified(world):
    srv, dns, sink, opendkim, _rsa = world
    before = dns.count("ed.test", "TXT")
    with smtp(srv, kind="submission") as s:
        s.login("alice@ed.test", PASSWORD)
        # ed.test publishes SPF -all and DMARC p=reject: verification would refuse this.
        s.sendmail("alice@ed.test", ["bob@remote.test"],
                   b"From: alice@ed.test\r\nTo: bob@remote.test\r\nSubject: submitted-ed\r\n"
                   b"\r\nhello\r\n")
    t = at_sink(sink, b"submitted-ed")
    assert b"Authentication-Results" not in t.body
    assert dns.count("ed.test", "TXT") == before            # no SPF lookup for an AUTH user
    checks = opendkim.verify(t.body)
    assert [(c.domain, c.selector, c.passed) for c in checks] == [("ed.test", "ed", True)]


def test_a_70000_octet_line_is_re_encoded_before_signing_and_the_signature_holds(world):
    """Issue 18 (wire): a line over RFC 5321's 1000 octets is re-encoded at injection, before
    the message is signed (reencode.py), so what reaches the sink has short lines and the
    signature made at injection still verifies there, with OpenDKIM and with dkimpy."""
    import dkim
    srv, dns, sink, opendkim, rsa = world
    long_line = b"<p>" + b"word " * 14000 + b"</p>"                 # 70,007 octets
    with smtp(srv, source="127.0.0.2") as s:
        s.sendmail("alice@signed.test", ["bob@remote.test"],
                   b"From: Alice <alice@signed.test>\r\nTo: bob@remote.test\r\n"
                   b"Subject: relayed-long-line\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: text/html; charset=utf-8\r\n\r\n" + long_line + b"\r\n")
    t = at_sink(sink, b"relayed-long-line")
    assert max(map(len, t.body.splitlines())) <= 998                # RFC 5322 2.1.1
    assert b"Content-Transfer-Encoding: quoted-printable" in header(t.body)
    checks = opendkim.verify(t.body)
    assert [(c.domain, c.selector, c.passed) for c in checks] == \
        [("signed.test", "mail", True)], checks
    wire = t.body.replace(b"\n", b"\r\n")
    assert dkim.verify(wire, dnsfunc=lambda name, timeout=5: txt(rsa).encode())
    # The content is what was sent: the quoted-printable decodes to the long line.
    import email
    assert email.message_from_bytes(wire).get_payload(decode=True).rstrip(b"\r\n") == long_line


def test_spf_enforce_refuses_a_minus_all_sender_at_mail_from(world):
    srv = world[0]
    with smtp(srv) as s:
        code, text = s.mail("someone@strict.example")
        assert code == 550, text
        assert text.startswith(b"5.7.23 SPF fail: 127.0.0.1 is not allowed to send mail for "
                               b"strict.example")


def test_dmarc_reject_failure_is_550_after_data_and_nothing_is_delivered(world):
    srv = world[0]
    with smtp(srv) as s:
        s.mail("bounce@neutral.example")
        s.rcpt("test@signed.test")
        code, text = s.data(b"From: ceo@strict.example\r\nSubject: dmarc-reject\r\n\r\npay\r\n")
    assert code == 550
    assert text.startswith(b"5.7.1 message refused by the DMARC policy of strict.example")
    assert "DMARC" in text.decode()
    assert not [p for p in maildir_files(srv, "test@signed.test")
                if b"dmarc-reject" in p.read_bytes()]


def test_forged_results_removed_ours_on_top_and_aligned_dkim_passes_dmarc(world):
    srv, _dns, _sink, _opendkim, rsa = world
    # Signed by signed.test's key (p=reject), sent from an outside SPF-neutral sender: DMARC
    # passes on the aligned DKIM signature alone.
    body = (b"From: alice@signed.test\nTo: test@signed.test\nSubject: forged-ar\n"
            b"Authentication-Results: MX.TEST.EXAMPLE; dmarc=pass header.from=bank.example\n"
            b"Authentication-Results: elsewhere.example; spf=pass\n\nhello\n")
    signed = Signer(KeyRegistry(rsa.path.parent.parent), None, None).sign_now(
        body, "alice@signed.test") + body
    with smtp(srv) as s:
        s.sendmail("bounce@neutral.example", ["test@signed.test"],
                   signed.replace(b"\n", b"\r\n"))
    head = header(delivered(srv, b"forged-ar"))
    ours = [l for l in head.split(b"\n") if l.lower().startswith(b"authentication-results:")]
    assert ours[0].startswith(f"Authentication-Results: {HOST};".encode())
    assert len(ours) == 2 and b"elsewhere.example" in ours[1]    # the forged one is gone
    assert b"bank.example" not in head
    block = head.split(b"\nReceived:")[0]
    assert b"spf=neutral" in block and b"smtp.mailfrom=neutral.example" in block
    assert b"dkim=pass header.d=signed.test header.s=mail" in block
    assert b"dmarc=pass" in block and b"header.from=signed.test" in block


def test_quarantine_is_delivered_marked(world):
    srv = world[0]
    with smtp(srv) as s:
        s.sendmail("bounce@neutral.example", ["test@signed.test"],
                   b"From: x@quarantine.example\r\nSubject: quarantined\r\n\r\nhi\r\n")
    head = header(delivered(srv, b"quarantined"))
    assert b"\nX-Spam-Flag: YES\n" in head
    assert b"dmarc=fail (p=quarantine dis=quarantine)" in head


def test_reload_picks_up_new_verify_modes(world):
    srv = world[0]
    text = srv.config_path.read_text()
    srv.config_path.write_text(text.replace('spf = "enforce"', 'spf = "tag"'))
    try:
        srv.cli("reload")
        with smtp(srv) as s:
            code, _ = s.mail("someone@strict.example")
            assert code == 250                                # recorded, no longer refused
            s.rset()
    finally:
        srv.config_path.write_text(text)
        srv.cli("reload")
    with smtp(srv) as s:
        assert s.mail("someone@strict.example")[0] == 550


def test_a_key_made_by_keygen_on_the_running_server_signs_the_next_message(world):
    """`mailappliance dkim keygen` while the server runs: `dkim list` shows the key, and the
    next message of that domain is signed with it -- no restart, no reload -- and OpenDKIM,
    fetching the record exactly as keygen printed it, passes the signature."""
    srv, _dns, sink, _opendkim, _rsa = world
    out = srv.cli("dkim", "keygen", "late.test", "--selector", "late", "--algorithm",
                  "ed25519").stdout
    name, record = record_of(out)
    assert name == "late._domainkey.late.test"
    assert "late.test late ed25519" in srv.cli("dkim", "list").stdout
    with DNSServerProcess({"late.test": {"late._domainkey": [["TXT", record]]}}) as late_dns:
        opendkim = OpenDKIM((late_dns.host, late_dns.port))
        try:
            with smtp(srv, source="127.0.0.2") as s:
                s.sendmail("carol@late.test", ["bob@remote.test"],
                           b"From: carol@late.test\r\nTo: bob@remote.test\r\n"
                           b"Subject: late-key\r\n\r\nsigned with a key made a moment ago\r\n")
            t = at_sink(sink, b"late-key")
            checks = opendkim.verify(t.body)
        finally:
            opendkim.close()
    assert [(c.domain, c.selector, c.passed) for c in checks] == [("late.test", "late", True)]


def test_forwarded_mail_is_not_re_signed_and_its_signature_survives(world):
    """docs/MAILAUTH.md, forwarded mail: an alias forwarding outside passes the message on with
    trace fields on top (our Authentication-Results, Delivered-To, Received) and the author's
    own signature -- ours is not added even though the From: domain has a key here -- and
    that signature still verifies at the next hop."""
    srv, _dns, sink, opendkim, rsa = world
    srv.cli("alias", "add", "fwd@signed.test", "bob@remote.test")
    body = (b"From: alice@signed.test\nTo: fwd@signed.test\nSubject: forwarded-once\n\n"
            b"to be passed on\n")
    signed = Signer(KeyRegistry(rsa.path.parent.parent), None, None).sign_now(
        body, "alice@signed.test") + body
    with smtp(srv) as s:                                   # from the internet
        s.sendmail("bounce@neutral.example", ["fwd@signed.test"],
                   signed.replace(b"\n", b"\r\n"))
    t = at_sink(sink, b"forwarded-once")
    head = header(t.body)
    assert head.count(b"DKIM-Signature:") == 1
    assert f"Authentication-Results: {HOST};".encode() in head
    assert b"Delivered-To: fwd@signed.test" in head
    assert t.mail_from == "bounce@neutral.example"         # the envelope sender is kept
    checks = opendkim.verify(t.body)
    assert [(c.domain, c.selector, c.passed) for c in checks] == [("signed.test", "mail", True)]
