"""queue/bounce.py: qmail-send's bounce text and the bounce / double / triple rules."""

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
                          message_id="1700000000.42.bounce")


def test_single_bounce_matches_qmail_text():
    text = make().decode()
    head, _, body = text.partition("\n\n")
    assert "From: MAILER-DAEMON@mail.test.com" in head.split("\n")
    assert "To: alice@example.org" in head.split("\n")
    assert "Subject: failure notice" in head.split("\n")
    assert "Message-ID: <1700000000.42.bounce@mail.test.com>" in head.split("\n")
    assert head.startswith("Date: Tue, 14 Nov 2023 22:13:20 GMT")
    assert body == (
        "Hi. This is the qmail-send program at mail.test.com.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n"
        "\n"
        "<nobody@test.com>:\n"
        "Sorry, no mailbox here by that name. (#5.1.1)\n"
        "\n"
        "--- Below this line is a copy of the message.\n"
        "\n"
        "Return-Path: <alice@example.org>\n"
        "Subject: hi\n\nhello\n")


def test_several_failures_each_with_multi_line_report():
    text = make(failures=[("a@x.test", "line one\nline two"), ("b@y.test", "other")]).decode()
    assert "<a@x.test>:\nline one\nline two\n\n<b@y.test>:\nother\n\n--- Below" in text


def test_double_bounce_text_and_envelope():
    assert bounce_kind("") == "double"
    assert bounce_envelope("", "postmaster@test.com") == (DOUBLE_BOUNCE_SENDER,
                                                           "postmaster@test.com")
    text = make(sender="", recipient="postmaster@test.com").decode()
    assert "To: postmaster@test.com" in text
    assert "I tried to deliver a bounce message to this address, but the bounce bounced!" in text
    assert "--- Below this line is the original bounce.\n\nReturn-Path: <>\n" in text


def test_triple_bounce_is_dropped_and_ordinary_bounce_goes_to_sender():
    assert bounce_kind(DOUBLE_BOUNCE_SENDER) == "triple"
    assert bounce_envelope(DOUBLE_BOUNCE_SENDER, "postmaster@test.com") is None
    assert bounce_envelope("a@b.test", "postmaster@test.com") == ("", "a@b.test")


def test_large_original_is_cut_at_a_line_end():
    original = b"Subject: big\n\n" + b"0123456789" * 100 + b"\n"
    original = original * (BOUNCE_MAX_COPY // len(original) + 5)
    msg = make(original=original)
    copy = msg.split(b"Return-Path: <alice@example.org>\n", 1)[1]
    kept, note = copy.rsplit(b"\n--- Rest of message not included", 1)
    assert len(kept) <= BOUNCE_MAX_COPY
    assert original.startswith(kept)
    assert kept.endswith(b"\n")


def test_control_characters_in_reports_and_addresses_cannot_add_headers():
    msg = make(sender="a@b.test\r\nBcc: victim@x", failures=[("x\ny@z", "t\r\nX: y")]).decode()
    head = msg.split("\n\n", 1)[0].split("\n")
    assert [h.split(":", 1)[0] for h in head] == ["Date", "From", "To", "Subject", "Message-ID"]
    assert "<x?y@z>:\nt\nX: y\n" in msg   # a report line is body text, never a header
