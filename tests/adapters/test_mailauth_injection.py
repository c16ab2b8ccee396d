"""DKIM signing at each injection path, with real keys under data/dkim and the real signing
core: SMTP from a RELAYCLIENT client (the end-of-DATA check), bounces (the queue manager's
hook as build_queue wires it), the sendmail command (synchronously, without Twisted); and an
unusable key file is one log line at start-up. Signatures are checked with dkimpy, an
implementation other than our signer's (OpenDKIM checks them in tests/integration)."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import dkim
from twisted.logger import capturedLogs, formatEvent

from mailappliance import sendmail
from mailappliance.config import DKIMSettings, VerifySettings
from mailappliance.mailauth import keys
from mailappliance.queue.store import QueueStore

from tests.adapters.test_smtp_protocol import HOST, World, codes


def verifies(message: bytes, *ks) -> list[bool]:
    """dkimpy's verdict on each signature (top down), the key records given by name."""
    records = {f"{k.name}.".encode(): k.txt_record().encode() for k in ks}
    crlf = message.replace(b"\n", b"\r\n")
    n = crlf.split(b"\r\n\r\n")[0].count(b"DKIM-Signature:")
    d = dkim.DKIM(crlf)
    return [d.verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name))
            for i in range(n)]


def test_relayclient_mail_is_signed_with_both_keys_of_the_from_domain(tmp_path):
    rsa = keys.generate(tmp_path, "test.com", "mail", "rsa")
    ed = keys.generate(tmp_path, "test.com", "ed", "ed25519")
    w = World(tmp_path, rules='127.0.0.5:allow,RELAYCLIENT=""\n',
              fields={"dkim": DKIMSettings()})
    c = w.connect("127.0.0.5")
    c.take()
    out = c.chat(b"EHLO c\r\nMAIL FROM:<alice@test.com>\r\nRCPT TO:<x@remote.example>\r\n"
                 b"DATA\r\nFrom: Alice <alice@test.com>\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")
    assert codes(out) == [250, 250, 250, 354, 250]
    ((_s, _r, stored),) = w.queued()
    assert stored.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; "
                             b"d=test.com; s=mail;")
    assert stored.count(b"DKIM-Signature:") == 2
    assert verifies(stored, rsa, ed) == [True, True]
    # A sender of another domain without a key: unsigned.
    c.chat(b"MAIL FROM:<x@other.example>\r\nRCPT TO:<x@remote.example>\r\n"
           b"DATA\r\nFrom: x@other.example\r\n\r\nb\r\n.\r\n")
    assert sorted(m.count(b"DKIM-Signature:") for _s, _r, m in w.queued()) == [0, 2]


def test_bounces_of_a_domain_with_a_key_are_signed_and_sign_off_leaves_them(tmp_path):
    key = keys.generate(tmp_path, HOST, "mail", "ed25519")
    w = World(tmp_path, fields={"dkim": DKIMSettings()})
    manager = w.app.queue_manager
    bounce = (f"From: MAILER-DAEMON@{HOST}\nTo: a@remote.example\nSubject: failure notice\n"
              f"\nsorry\n").encode()
    got = []
    manager.sign_bounce(bounce).addBoth(got.append)
    assert verifies(got[0] + bounce, key) == [True]
    w.app.reload(dataclasses.replace(w.app.settings, dkim=DKIMSettings(sign=False)))
    assert manager.sign_bounce(bounce) is None


def test_unusable_key_file_is_one_line_at_start_and_the_good_key_still_signs(tmp_path):
    good = keys.generate(tmp_path, "test.com", "mail", "rsa")
    (tmp_path / "dkim" / "bad._domainkey.test.com.pem").write_text("not a key\n")
    with capturedLogs() as events:
        w = World(tmp_path, rules='127.0.0.5:allow,RELAYCLIENT=""\n')
    lines = [formatEvent(e) for e in events if "key file" in formatEvent(e)]
    assert len(lines) == 1
    assert "bad._domainkey.test.com.pem: not a PEM private key" in lines[0]
    with capturedLogs() as events:
        c = w.connect("127.0.0.5")
        c.take()
        c.chat(b"HELO c\r\nMAIL FROM:<alice@test.com>\r\nRCPT TO:<x@remote.example>\r\n"
               b"DATA\r\nFrom: alice@test.com\r\n\r\nb\r\n.\r\n")
    assert not [e for e in events if "key file" in formatEvent(e)]     # once, not per message
    ((_s, _r, stored),) = w.queued()
    assert verifies(stored, good) == [True]


def test_internet_mail_is_never_signed(tmp_path):
    keys.generate(tmp_path, "test.com", "mail", "ed25519")
    w = World(tmp_path, fields={"verify": VerifySettings("off", "off", "off")})
    c = w.connect("127.0.0.5")
    c.take()
    c.chat(b"HELO c\r\nMAIL FROM:<alice@test.com>\r\nRCPT TO:<alice@test.com>\r\n"
           b"DATA\r\nFrom: alice@test.com\r\n\r\nb\r\n.\r\n")
    ((_s, _r, stored),) = w.queued()
    assert b"DKIM-Signature" not in stored


def test_sendmail_signs_synchronously_with_the_same_core(tmp_path):
    data = tmp_path / "var"
    data.mkdir()
    (data / "users.sqlite").touch()            # an instance (sendmail writes no other's queue)
    key = keys.generate(data, "test.com", "mail", "rsa")
    err = io.StringIO()
    code = sendmail.main(["--data", str(data), "-f", "cron@test.com", "r@remote.example"],
                         stdin=io.BytesIO(b"From: cron@test.com\nSubject: t\n\nhello\n"),
                         stderr=err)
    assert (code, err.getvalue()) == (0, "")
    q = QueueStore(data / "queue")
    stored = q.read_message(q.read_envelope(q.list_ids()[0]))
    assert stored.startswith(b"DKIM-Signature:")
    assert verifies(stored, key) == [True]


def test_sendmail_with_a_key_still_loads_no_twisted(tmp_path):
    data = tmp_path / "var"
    data.mkdir()
    (data / "users.sqlite").touch()            # an instance (sendmail writes no other's queue)
    keys.generate(data, "test.com", "mail", "ed25519")
    script = (
        "import io, sys\n"
        "from mailappliance import sendmail\n"
        f"b = sendmail.main(['--data', {str(data)!r}, '-f', 'a@test.com', 'r@test.com'],"
        " stdin=io.BytesIO(b'From: a@test.com\\n\\nhi\\n'))\n"
        "print(b, sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.split("\n")[-2] == "0 []", out
    q = QueueStore(data / "queue")
    assert q.read_message(q.read_envelope(q.list_ids()[0])).startswith(b"DKIM-Signature:")


def test_inject_socket_mail_is_signed_once_and_streams_when_no_key_exists(tmp_path):
    from mailappliance.enddata import HeldMessage
    from mailappliance.queue.inject import MessageWriter
    from tests.adapters.test_pickup_service import connect, make, reply, request
    app, factory = make(tmp_path)
    proto, t = connect(factory)
    data = request(b"Subject: before\n\nno key yet\n")
    proto.dataReceived(data[:-3])
    assert isinstance(proto.writer, MessageWriter)      # no key anywhere: streamed as before
    proto.dataReceived(data[-3:])
    assert reply(t)[0] == 0
    key = keys.generate(tmp_path / "var", "test.com", "mail", "ed25519")
    proto, t = connect(factory)
    data = request(b"Subject: after\n\nsigned\n")
    proto.dataReceived(data[:-3])
    assert isinstance(proto.writer, HeldMessage)        # the new key is seen at once
    proto.dataReceived(data[-3:])
    code, text = reply(t)
    assert code == 0, text
    stored = app.queue_store.read_message(app.queue_store.read_envelope(int(text.split()[-1])))
    assert stored.count(b"DKIM-Signature:") == 1
    assert verifies(stored, key) == [True]
