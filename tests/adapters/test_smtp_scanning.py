"""Content scanning in the SMTP session: scan/service.py's ScanCheck as an end-of-DATA check
(enddata.py, driven by smtp/protocol.py), with Twisted's doubles (test_smtp_protocol's World:
StringTransport clients, a MemoryReactorClock, the real queue) and the verified fake scanners
on the same clock. The real daemons and the real server are in test_scan_daemons.py and
tests/integration/test_scan_server.py."""

from __future__ import annotations

from mailappliance.config import load_settings
from mailappliance.scan.policy import Scanning
from mailappliance.testing.scanners import (
    EICAR, SPAM_TOKEN, FakeSpamScorer, FakeVirusScanner)
from tests.adapters.test_smtp_protocol import HOST, TRANSACTION, World, codes


def scanning_world(tmp_path, *, on_error="tempfail", max_bytes=100_000, scan_timeout=30,
                   **kw):
    """World (rules=, smtp settings as keywords) with the fake scanners behind app.scan."""
    w = World(tmp_path, **kw)
    w.virus = FakeVirusScanner(clock=w.reactor, timeout=scan_timeout)
    w.spam = FakeSpamScorer(clock=w.reactor, timeout=scan_timeout)
    w.app.scan.scanning = Scanning(w.reactor, virus=w.virus, spam=w.spam, on_error=on_error,
                              max_bytes=max_bytes, hostname=HOST)
    return w


def start(w, ip="127.0.0.5", hello=b"HELO client.example\r\n"):
    c = w.connect(ip)
    c.take()
    assert codes(c.chat(TRANSACTION.replace(b"HELO client.example\r\n", hello))) == \
        [250, 250, 250, 354]
    return c


def test_clean_message_is_stored_with_the_verdict_headers_on_top(tmp_path):
    w = scanning_world(tmp_path)
    c = start(w)
    reply = c.chat(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert reply.startswith("250 ok ")
    ((_, _, message),) = w.queued()
    lines = message.split(b"\n")
    assert lines[0:4] == [b"X-Virus-Scanned: clean (clamd) on mx.test.com",
                          b"X-Spam-Score: 0.0", b"X-Spam-Level: ",
                          b"X-Spam-Status: No, score=0.0 tag=6.0 reject=15.0 scorer=rspamd"]
    assert lines[4].startswith(b"Received: from unknown (HELO client.example) (127.0.0.5)")
    assert message.endswith(b"\nSubject: hi\n\nhello\n")
    (scanned,) = w.virus.calls                                  # once, in the stored form,
    assert scanned.startswith(b"Received: ")                    # as it would be queued
    assert scanned.endswith(b"\nSubject: hi\n\nhello\n")


def test_virus_is_554_naming_it_nothing_stored_and_the_session_goes_on(tmp_path):
    w = scanning_world(tmp_path)
    c = start(w, hello=b"EHLO client.example\r\n")
    reply = c.chat(b"Subject: x\r\n\r\n" + EICAR + b"\r\n.\r\n")
    assert reply == ("554 5.7.0 sorry, your message contains a virus (Eicar-Test-Signature);"
                     " it was not accepted (#5.7.0)\r\n")
    assert w.queued() == [] and w.queue.tmp_files() == []
    assert codes(c.chat(b"MAIL FROM:<bob@remote.example>\r\nRCPT TO:<alice@test.com>\r\n"
                        b"DATA\r\n")) == [250, 250, 354]
    assert c.chat(b"fine\r\n.\r\n").startswith("250 2.0.0 ok")
    assert len(w.queued()) == 1


def test_spam_is_550(tmp_path):
    w = scanning_world(tmp_path)
    c = start(w)
    reply = c.chat(b"Subject: x\r\n\r\nbuy " + SPAM_TOKEN + b"\r\n.\r\n")
    assert reply.startswith("550 sorry, your message looks like spam (score 20.0, limit 15.0)")
    assert w.queued() == []
    env = w.spam.envelopes[0]
    assert (env.client_ip, env.helo, env.sender, env.recipients) == \
        ("127.0.0.5", "client.example", "bob@remote.example", ("alice@test.com",))


def test_a_hanging_scan_holds_only_its_session_and_pipelined_replies_stay_in_order(tmp_path):
    w = scanning_world(tmp_path, scan_timeout=30)
    w.virus.mode = "hang"
    c = start(w)
    c.send(b"one\r\n.\r\nMAIL FROM:<b@remote.example>\r\nRCPT TO:<alice@test.com>\r\nNOOP\r\n")
    assert c.take() == ""                                      # nothing before the verdict
    other = w.connect("127.0.0.6")                             # another session meanwhile
    other.take()
    assert codes(other.chat(b"HELO o\r\nMAIL FROM:<>\r\nRCPT TO:<alice@test.com>\r\nNOOP\r\n"
                            )) == [250, 250, 250, 250]
    w.reactor.advance(29.9)
    assert c.take() == ""
    w.reactor.advance(0.1)
    out = c.take()
    assert codes(out) == [451, 250, 250, 250]
    assert out.startswith("451 sorry, the content scanner is unavailable, try again later")
    assert w.queued() == [] and w.queue.tmp_files() == []


def test_the_idle_timer_does_not_cut_a_session_waiting_for_its_scan(tmp_path):
    w = scanning_world(tmp_path, scan_timeout=30, timeout=10)      # [smtp] timeout = 10
    w.virus.mode = "hang"
    c = start(w)
    c.send(b"one\r\n.\r\n")
    w.reactor.advance(25)                                      # past the 10 s idle timeout
    assert not c.closed
    w.reactor.advance(5)
    assert codes(c.take()) == [451]


def test_trusted_client_is_scanned_not_scored(tmp_path):
    w = scanning_world(tmp_path, rules='127.0.0.5:allow,RELAYCLIENT=""\n')
    c = start(w)
    assert c.chat(b"\r\nbuy " + SPAM_TOKEN + b"\r\n.\r\n").startswith("250 ok")
    assert w.spam.calls == [] and len(w.virus.calls) == 1
    ((_, _, message),) = w.queued()
    assert b"X-Spam" not in message and b"X-Virus-Scanned: clean" in message
    c2 = start(w)
    assert c2.chat(b"\r\n" + EICAR + b"\r\n.\r\n").startswith("554 ")


def test_message_over_max_bytes_goes_to_no_scanner_and_is_queued_marked(tmp_path):
    w = scanning_world(tmp_path, max_bytes=1000)
    c = start(w)
    body = b"".join(b"line %04d " % i + b"x" * 60 + b"\r\n" for i in range(100))   # ~7 KB
    for i in range(0, len(body), 500):
        c.send(body[i:i + 500])
    assert c.chat(b".\r\n").startswith("250 ok")
    assert w.virus.calls == [] and w.spam.calls == []
    ((_, _, message),) = w.queued()
    lines = message.split(b"\n")
    assert lines[0] == (b"X-Virus-Scanned: NOT SCANNED on mx.test.com: message larger than the"
                        b" scan limit of 1000 bytes")
    assert message.endswith(body.replace(b"\r\n", b"\n"))


def test_a_client_that_leaves_during_the_scan_gets_nothing_stored(tmp_path):
    w = scanning_world(tmp_path, on_error="accept")
    c = start(w)
    w.spam.mode = "hang"
    c.send(b"one\r\n.\r\n")
    c.lose()
    w.reactor.advance(30)            # the verdict arrives: accept (unscored), for nobody
    assert w.queued() == [] and w.queue.tmp_files() == []
    c2 = start(w)                    # the same verdict for a client still there: queued
    c2.send(b"two\r\n.\r\n")
    w.reactor.advance(30)
    assert c2.take().startswith("250 ok") and len(w.queued()) == 1


def test_on_error_accept_stores_the_message_marked_not_scanned(tmp_path):
    w = scanning_world(tmp_path, on_error="accept")
    w.virus.mode = "down"
    c = start(w)
    assert c.chat(b"\r\nhi\r\n.\r\n").startswith("250 ok")
    ((_, _, message),) = w.queued()
    assert message.startswith(b"X-Virus-Scanned: NOT SCANNED on mx.test.com: clamd unavailable:")


def test_scan_settings_load_and_reload_into_the_check(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'hostname = "{HOST}"\ndata = "{tmp_path / "var"}"\n')
    from mailappliance.testing.app import build_test_app
    app = build_test_app(settings=load_settings(cfg))
    assert app.scan.scanning is None
    cfg.write_text(cfg.read_text() + '[scan]\nclamd = "/run/clamav/clamd.ctl"\n'
                   'spam_reject_score = 10\n')
    app.reload(load_settings(cfg))
    first = app.scan.scanning
    assert first.virus.name == "clamd" and first.spam is None
    assert first.thresholds.reject == 10.0 and first.max_bytes == 26214400
    app.reload(load_settings(cfg))
    assert app.scan.scanning is first                               # same keys: same object
    cfg.write_text(cfg.read_text().replace("10\n", "12.5\n"))
    app.reload(load_settings(cfg))
    assert app.scan.scanning is not first and app.scan.scanning.thresholds.reject == 12.5
    cfg.write_text(cfg.read_text().replace('clamd = "/run/clamav/clamd.ctl"\n', ""))
    app.reload(load_settings(cfg))
    assert app.scan.scanning is None                                # [scan] emptied: off again
