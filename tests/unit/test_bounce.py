"""queue/bounce.py: qmail-send's bounce text in an RFC 3464 report, and the bounce / double /
triple rules. Reports are read back with Python's email package, as a mail program would."""

import email
import email.policy

from mailappliance.queue.bounce import (
    BOUNCE_MAX_COPY, DOUBLE_BOUNCE_SENDER, bounce_envelope, bounce_kind, bounce_message)

NOW = 1_700_000_000.0


def make(sender="alice@example.org", failures=None, original=b"Subject: hi\n\nhello\n",
         truncated=False, recipient=None):
    return bounce_message(hostname="mail.test.com", sender=sender,
                          recipient=recipient or sender or "postmaster@test.com",
                          failures=failures or [("nobody@test.com",
                                                 "Sorry, no mailbox here by that name. (#5.1.1)")],
                          original=original, truncated=truncated, now=NOW,
                          message_id="1700000000.42.bounce", arrival=NOW - 100)


def parse(raw: bytes):
    """(message, [its three parts]) as the email package reads them."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.defects == []
    return msg, list(msg.iter_parts())


def human_text(raw: bytes) -> str:
    return parse(raw)[1][0].get_content()


def status_groups(raw: bytes) -> list:
    """The message/delivery-status part: [per-message fields, per-recipient fields...]."""
    part = parse(raw)[1][1]
    assert part.get_content_type() == "message/delivery-status"
    return part.get_payload()


def test_single_bounce_is_an_rfc3464_report_with_qmail_text_first():
    raw = make()
    msg, parts = parse(raw)
    assert msg["From"] == "MAILER-DAEMON@mail.test.com"
    assert msg["To"] == "alice@example.org"
    assert msg["Subject"] == "failure notice"
    assert msg["Message-ID"] == "<1700000000.42.bounce@mail.test.com>"
    assert msg["Date"].datetime.timestamp() == NOW
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert parts[0].get_content() == (
        "Hi. This is the qmail-send program at mail.test.com.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n"
        "\n"
        "<nobody@test.com>:\n"
        "Sorry, no mailbox here by that name. (#5.1.1)\n"
        "\n"
        "--- Below this line is a copy of the message.\n")
    per_message, per_rcpt = status_groups(raw)
    assert per_message["Reporting-MTA"] == "dns; mail.test.com"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:11:40 GMT"
    assert per_rcpt["Final-Recipient"] == "rfc822; nobody@test.com"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Diagnostic-Code"] is None
    [original] = parts[2].get_payload()
    assert original["Return-Path"] == "<alice@example.org>"
    assert original["Subject"] == "hi"
    assert original.get_content() == "hello\n"


def test_remote_refusal_names_the_remote_host_and_its_reply():
    raw = make(failures=[("bob@example.net",
                          "192.0.2.25 does not like recipient.\n"
                          "Remote host said: 550 5.1.1 <bob@example.net>: no such user\n"
                          "Giving up on 192.0.2.25."),
                         ("carol@example.net", "Connected to 192.0.2.26 but sender was "
                          "rejected.\nRemote host said: 554 go away")])
    _, bob, carol = status_groups(raw)
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; 192.0.2.25"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    assert carol["Status"] == "5.0.0" and carol["Remote-MTA"] == "dns; 192.0.2.26"
    assert carol["Diagnostic-Code"] == "smtp; 554 go away"


def test_several_failures_each_with_multi_line_report():
    raw = make(failures=[("a@x.test", "line one\nline two"), ("b@y.test", "other")])
    assert "<a@x.test>:\nline one\nline two\n\n<b@y.test>:\nother\n\n--- Below" in human_text(raw)
    assert [g["Final-Recipient"] for g in status_groups(raw)[1:]] == [
        "rfc822; a@x.test", "rfc822; b@y.test"]


def test_double_bounce_text_and_envelope():
    assert bounce_kind("") == "double"
    assert bounce_envelope("", "postmaster@test.com") == (DOUBLE_BOUNCE_SENDER,
                                                           "postmaster@test.com")
    raw = make(sender="", recipient="postmaster@test.com")
    msg, parts = parse(raw)
    assert msg["To"] == "postmaster@test.com"
    text = parts[0].get_content()
    assert "I tried to deliver a bounce message to this address, but the bounce bounced!" in text
    assert text.endswith("--- Below this line is the original bounce.\n")
    assert parts[2].get_payload()[0]["Return-Path"] == "<>"


def test_triple_bounce_is_dropped_and_ordinary_bounce_goes_to_sender():
    assert bounce_kind(DOUBLE_BOUNCE_SENDER) == "triple"
    assert bounce_envelope(DOUBLE_BOUNCE_SENDER, "postmaster@test.com") is None
    assert bounce_envelope("a@b.test", "postmaster@test.com") == ("", "a@b.test")


def test_large_original_is_returned_as_its_header_only():
    original = b"Subject: big\nMessage-ID: <big@x>\n\n" + (b"0123456789" * 100 + b"\n") * (
        BOUNCE_MAX_COPY // 1000 + 5)
    raw = make(original=original)
    assert len(raw) < 10_000
    _, parts = parse(raw)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert parts[2].get_content() == ("Return-Path: <alice@example.org>\nSubject: big\n"
                                      "Message-ID: <big@x>\n")
    assert parts[0].get_content().endswith(
        f"--- Below this line is the header of the message (it is over {BOUNCE_MAX_COPY} "
        "bytes).\n")


def test_already_cut_original_is_returned_as_its_header_only():
    _, parts = parse(make(original=b"Subject: s\n\nbody", truncated=True))
    assert parts[2].get_content_type() == "text/rfc822-headers"


def test_boundary_never_occurs_in_the_returned_message():
    first = make()
    boundary = parse(first)[0].get_boundary()
    evil = b"Subject: x\n\n--" + boundary.encode() + b"\n--" + boundary.encode() + b"--\n"
    raw = make(original=evil)
    msg, parts = parse(raw)
    assert msg.get_boundary() != boundary and len(parts) == 3
    assert parts[2].get_payload()[0].get_content() == evil.split(b"\n\n", 1)[1].decode()


def test_control_characters_in_reports_and_addresses_cannot_add_headers():
    raw = make(sender="a@b.test\r\nBcc: victim@x", failures=[("x\ny@z", "t\r\nX: y")])
    head = raw.decode().split("\n\n", 1)[0].split("\n")
    assert [h.split(":", 1)[0] for h in head if not h.startswith("\t")] == [
        "Date", "From", "To", "Subject", "Message-ID", "Auto-Submitted", "MIME-Version",
        "Content-Type"]
    assert "<x?y@z>:\nt\nX: y\n" in human_text(raw)   # a report line is body text, never a header
    [_, rcpt] = status_groups(raw)
    assert rcpt["Final-Recipient"] == "rfc822; x?y@z"


def test_the_copy_of_a_message_with_a_long_line_is_re_encoded_before_it_is_signed():
    """Issue 18 (wire): a bounce is signed when it is made, so its copy of a message with a
    line over RFC 5321's limit is re-encoded here, not at send time (reencode.py)."""
    original = b"Subject: long\n\n" + b"w" * 5000 + b"\n"
    out = make(original=original)
    assert max(map(len, out.splitlines())) <= 998
    parsed = email.message_from_bytes(out)
    [copy] = [p for p in parsed.walk() if p.get_content_type() == "message/rfc822"]
    inner = copy.get_payload()[0]
    assert inner["Content-Transfer-Encoding"] == "quoted-printable"
    assert inner.get_payload(decode=True) == b"w" * 5000 + b"\n"
    short = make(original=b"Subject: short\n\nfine\n")
    assert b"quoted-printable" not in short
