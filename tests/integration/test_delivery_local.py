"""SMTP in, Maildir out, through the real server: local delivery, aliases, bounces, and
messages injected by another process (trigger)."""

from __future__ import annotations

import email
import email.policy

import smtplib
import time

from mailappliance.queue.store import QueueStore
from mailappliance.queue.manager import SCAN_INTERVAL
from tests.integration.delivery_support import maildir_files, queue_ids, wait_until


def send(server, rcpts, body: bytes, sender="alice@example.org"):
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30) as s:
        return s.sendmail(sender, rcpts, body)


def test_smtp_in_maildir_out(server):
    marker = f"e2e-{time.monotonic_ns()}"
    assert send(server, ["test@test.com"], f"Subject: {marker}\r\n\r\nhello\r\n".encode()) == {}
    [path] = wait_until(lambda: maildir_files(server), what="the Maildir delivery")
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <alice@example.org>\nDelivered-To: test@test.com\n"
                           b"Received: from ")
    assert f"Subject: {marker}\n\nhello\n".encode() in data
    assert path.parent.name == "new" and list((path.parent.parent / "tmp").iterdir()) == []
    wait_until(lambda: queue_ids(server) == [], what="the queue to empty")
    log = wait_until(lambda: "end msg" in server.output() and server.output(), what="end msg")
    assert "delivery 1: success: did_1+0+0/" in log
    assert "to local test@test.com" in log
    assert "status: local 0/10 remote 0/20" in log


def test_alias_forward_reaches_the_target_mailbox(server):
    server.cli("alias", "add", "sales@test.com", "test@test.com")
    send(server, ["sales@test.com"], b"Subject: for sales\r\n\r\nbuy\r\n")
    [path] = wait_until(lambda: maildir_files(server), what="the forwarded message")
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <alice@example.org>\nDelivered-To: test@test.com\n"
                           b"Delivered-To: sales@test.com\n")


def test_message_injected_by_another_process_is_delivered_at_once(server):
    """The sendmail command's path: QueueStore.inject in another process pokes the trigger."""
    store = QueueStore(server.data / "queue")
    started = time.monotonic()
    store.inject(b"Subject: from cron\n\nnightly\n", "root@test.com", ["test@test.com"])
    wait_until(lambda: maildir_files(server), timeout=SCAN_INTERVAL / 2,
               what="delivery after the trigger (well before the periodic scan)")
    assert time.monotonic() - started < SCAN_INTERVAL / 2


def test_unknown_local_recipient_bounces_to_the_sender(server):
    store = QueueStore(server.data / "queue")
    store.inject(b"Subject: lost\n\nwhere am I\n", "test@test.com", ["nobody@test.com"])
    [path] = wait_until(lambda: maildir_files(server), what="the bounce")
    data = path.read_bytes()
    assert b"Return-Path: <>\n" in data
    assert b"Subject: failure notice\n" in data
    assert b"Hi. This is the qmail-send program at mx.test.example." in data
    # An RFC 3464 report, as a mail program reads it: qmail's text, the status, the message.
    report = email.message_from_bytes(data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    human, status, returned = report.iter_parts()
    assert human.get_content().endswith(
        "<nobody@test.com>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
        "--- Below this line is a copy of the message.\n")
    _, rcpt = status.get_payload()
    assert (rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]) == (
        "rfc822; nobody@test.com", "failed", "5.1.1")
    [original] = returned.get_payload()
    assert original["Return-Path"] == "<test@test.com>" and original["Subject"] == "lost"
    assert original.get_content() == "where am I\n"
    wait_until(lambda: queue_ids(server) == [], what="the queue to empty")
    assert "bounce msg " in server.output()
