"""Remote delivery from the real server to a real receiving MTA (Postfix's smtp-sink) on
loopback, routed with [routes]; 5xx, 4xx and disconnects from the sink's -f/-r/-q options."""

from __future__ import annotations

import re
import time

import pytest

from mailappliance.queue.store import QueueStore
from tests.integration.delivery_support import (CaptureMX, SmtpSink, TrickleMX,
                                                maildir_files, queue_ids, wait_until)


@pytest.fixture
def sink_factory(tmp_path):
    sinks = []

    def make(*options):
        s = SmtpSink(tmp_path / f"sink{len(sinks)}", *options).start()
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        s.close()


def routed_server(make_server, sink, extra=""):
    srv = make_server(f'default_domain = "test.com"\n{extra}\n[routes]\n'
                      f'"example.org" = "127.0.0.1:{sink.port}"\n')
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    return srv.start()


# Every way a stored byte sequence could try to end DATA early or start a second
# transaction if it were passed through unnormalised or unstuffed.
SMUGGLING = (b"Subject: smuggling test\n\nline one\n"
             b".\nMAIL FROM:<evil@example.org>\nRCPT TO:<victim@example.org>\nDATA\n"
             b"smuggled 1\n.\n"
             b"x\r.\rMAIL FROM:<evil@example.org>\r"
             b"y\r\n.\r\nRCPT TO:<victim@example.org>\r\n"
             b"z\n.\r\nDATA\n"
             b"w\r.\nQUIT\n"
             b"..double dot\n.\n"
             b"last line without a line end.")


def test_stored_smuggling_sequences_arrive_as_exactly_one_transaction(make_server,
                                                                      sink_factory):
    sink = sink_factory()
    srv = routed_server(make_server, sink)
    QueueStore(srv.data / "queue").inject(SMUGGLING, "test@test.com", ["bob@example.org"])
    [t] = wait_until(lambda: sink.transactions(), what="the transaction at the sink")
    wait_until(lambda: queue_ids(srv) == [], what="the queue to empty")
    assert len(sink.transactions()) == 1
    assert t.mail_from == "test@test.com" and t.rcpts == ["bob@example.org"]
    expected = re.sub(rb"\r\n|\r|\n", b"\n", SMUGGLING) + b"\n"
    assert t.body == expected
    assert "delivery 1: success: 127.0.0.1_accepted_message./Remote_host_said:_250" \
        in srv.output()


def test_several_recipients_go_in_one_transaction(make_server, sink_factory):
    sink = sink_factory()
    srv = routed_server(make_server, sink)
    QueueStore(srv.data / "queue").inject(b"Subject: two\n\nhi\n", "test@test.com",
                                          ["a@example.org", "b@example.org"])
    [t] = wait_until(lambda: sink.transactions(), what="the transaction")
    assert t.rcpts == ["a@example.org", "b@example.org"]


def test_5xx_from_the_sink_bounces_to_the_sender(make_server, sink_factory):
    sink = sink_factory("-f", "RCPT")
    srv = routed_server(make_server, sink)
    QueueStore(srv.data / "queue").inject(b"Subject: hard\n\nno\n", "test@test.com",
                                          ["bob@example.org"])
    [bounce] = wait_until(lambda: maildir_files(srv), what="the bounce")
    data = bounce.read_bytes()
    assert b"<bob@example.org>:\n127.0.0.1 does not like recipient.\nRemote host said: 5" in data
    assert b"Subject: failure notice" in data
    # The RFC 3464 part names the remote server and its reply.
    assert b"\nRemote-MTA: dns; 127.0.0.1\nDiagnostic-Code: smtp; 5" in data
    wait_until(lambda: queue_ids(srv) == [], what="the queue to empty")


def test_4xx_from_the_sink_defers_and_keeps_the_message(make_server, sink_factory):
    sink = sink_factory("-r", "RCPT")
    srv = routed_server(make_server, sink)
    QueueStore(srv.data / "queue").inject(b"Subject: soft\n\nlater\n", "test@test.com",
                                          ["bob@example.org"])
    wait_until(lambda: "deferral: 127.0.0.1_does_not_like_recipient." in srv.output(),
               what="the deferral")
    assert len(queue_ids(srv)) == 1
    assert maildir_files(srv) == []
    listing = srv.cli("queue", "list").stdout
    assert "deferred  bob@example.org" in listing and "next try in" in listing


@pytest.mark.parametrize("command", ["DATA", "."])
def test_disconnect_from_the_sink_defers(make_server, sink_factory, command):
    sink = sink_factory("-q", command)
    srv = routed_server(make_server, sink)
    QueueStore(srv.data / "queue").inject(b"Subject: cut\n\noff\n", "test@test.com",
                                          ["bob@example.org"])
    wait_until(lambda: "deferral: Connected_to_127.0.0.1_but_connection_died." in srv.output(),
               what="the deferral")
    assert len(queue_ids(srv)) == 1
    assert sink.transactions() == [] or command == "."


def test_a_trickling_mx_is_cut_off_at_the_reply_deadline_and_the_message_deferred(
        make_server):
    """Issue 18: an MX that sends its greeting one byte every 0.2 s used to hold the delivery
    as long as it liked (each byte restarted the timer). With [queue] reply_timeout = 2 the
    greeting must be complete 2 s after connecting: we hang up after about 10 of its 200
    bytes, the recipient is deferred, and the log, `queue list` and, for a message past its
    lifetime, the bounce all say which host was too slow with what."""
    mx = TrickleMX()
    try:
        srv = routed_server(make_server, mx, extra="[queue]\nreply_timeout = 2\n")
        queue = QueueStore(srv.data / "queue")
        queue.inject(b"Subject: slow mx\n\nhello\n", "test@test.com", ["bob@example.org"])
        text = ("Connected to 127.0.0.1 but it sent its greeting too slowly: not complete "
                "within 2 s. (#4.4.2)")
        wait_until(lambda: "deferral: " + text.replace(" ", "_") in srv.output(),
                   what="the deferral")
        # The client hung up, not the MX: it had sent only part of its greeting.
        assert mx.closed_after and all(n < len(mx.greeting) for n in mx.closed_after)
        listing = srv.cli("queue", "list").stdout
        assert "deferred  bob@example.org" in listing
        assert "last error: " + text in listing
        # A message past its lifetime gets one last attempt; its bounce quotes the reason.
        old = QueueStore(srv.data / "queue", clock=lambda: time.time() - 8 * 86400)
        old.inject(b"Subject: old\n\nhello\n", "test@test.com", ["carol@example.org"])
        [bounce] = wait_until(lambda: maildir_files(srv), what="the bounce")
        data = bounce.read_bytes()
        assert b"<carol@example.org>:\n" + text.encode() in data
    finally:
        mx.close()


@pytest.mark.parametrize("filler", [0, 400_000], ids=["in-memory", "streamed"])
def test_a_stored_70000_octet_line_goes_out_re_encoded_in_lines_of_at_most_1000_octets(
        make_server, filler):
    """Issue 18 (wire): a queued message with a 70,000-octet line (one that never met the
    signer: from the queue's own door here) used to go out as one 70,002-octet line. It is
    re-encoded at send time (reencode.py): every line on the wire is within RFC 5321's 1000
    octets with its CRLF, and the message decodes to what was stored. Both the in-memory path
    and a message over PRELOAD_MAX (streamed unless it has to be re-encoded)."""
    import email
    mx = CaptureMX()
    try:
        srv = routed_server(make_server, mx)
        long_line = b"x=" + b"0123456789" * 7000                     # 70,002 octets
        body = b"short\n" * (filler // 6) + long_line + b"\nend\n"
        message = (b"From: test@test.com\nSubject: long line\nMIME-Version: 1.0\n"
                   b"Content-Type: text/plain; charset=us-ascii\n\n" + body)
        QueueStore(srv.data / "queue").inject(message, "test@test.com", ["bob@example.org"])
        [wire] = wait_until(lambda: mx.messages, what="the message at the MX")
        assert max(len(line) for line in wire.split(b"\r\n")) + 2 <= 1000
        assert b"\r\nContent-Transfer-Encoding: quoted-printable\r\n" in wire
        unstuffed = wire[:-3].replace(b"\r\n..", b"\r\n.")
        parsed = email.message_from_bytes(unstuffed)
        assert parsed.get_payload(decode=True).replace(b"\r\n", b"\n") == body
        assert re.search(r"remote: msg \d+: lines over 998 octets re-encoded for sending, "
                         r"\d+ -> \d+ bytes", srv.output())
        wait_until(lambda: queue_ids(srv) == [], what="the queue to empty")
    finally:
        mx.close()
