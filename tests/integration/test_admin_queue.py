"""Queue commands and stat against the real queue: a message to an unreachable route is
deferred, shows in stat and queue list, is retried by flush and bounced by remove --bounce."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.integration.delivery_support import closed_port
from tests.integration.opstools import admin, wait_for

PASSWORD = "Qu3ue-Test!"


@pytest.fixture
def stuck(make_server):
    srv = make_server()
    srv.root.mkdir(parents=True, exist_ok=True)
    rules = srv.root / "tcp.smtp"
    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n')
    srv.config_text = (f'default_domain = "test.com"\n[smtp]\nrules = "{rules}"\n'
                       f'[routes]\n"example.org" = "127.0.0.1:{closed_port()}"\n')
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
    srv.start()
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=20) as s:
        s.sendmail("test@test.com", ["far@example.org"],
                   b"Subject: stuck\r\n\r\nnobody is listening\r\n")
    return srv


def queue_ids(srv) -> list[str]:
    [(ok, lines)] = admin(srv, "queue list\n")
    assert ok
    return [l.split()[0] for l in lines if l[:1].isdigit() and "bytes" in l]


def test_deferred_message_in_stat_list_flush_and_remove_with_bounce(stuck):
    def deferred():
        [(ok, lines)] = admin(stuck, "stat\n")
        return any("deferral" in l for l in lines) and lines
    lines = wait_for(deferred, what="a deferral in stat's last errors")
    assert "messages in queue: 1" in lines
    assert any(l.startswith("status: local 0/10 remote ") for l in lines)

    [qid] = queue_ids(stuck)

    def recorded():
        # The deferral's log line comes first; its record and next try a moment later.
        [(ok, qlines)] = admin(stuck, "queue list\n")
        return "next try in " in qlines[0] and "attempts 1" in qlines[1] and qlines
    qlines = wait_for(recorded, what="the deferral recorded")
    assert "from <test@test.com>" in qlines[0]
    # Each recipient: its state, attempts, when, and the last error with host and errno.
    assert re.fullmatch(r"  deferred  far@example\.org  attempts 1, last \S+ ago", qlines[1])
    assert re.fullmatch(r"      last error: Sorry, I wasn't able to establish an SMTP "
                        r"connection\. \(#4\.4\.1\) / 127\.0\.0\.1:\d+: Connection refused "
                        r"\(errno 111\)", qlines[2]), qlines[2]
    assert qlines[3:] == ["1 messages"]

    [(ok, flushed)] = admin(stuck, "queue flush\n")
    assert ok and flushed == ["1 deferred messages scheduled for delivery now"]

    res = stuck.cli("queue", "remove", qid, "--bounce", check=False)
    if res.returncode != 0:     # the flushed retry may be in flight for a moment
        assert "in progress" in res.stderr
        wait_for(lambda: stuck.cli("queue", "remove", qid, "--bounce",
                                   check=False).returncode == 0, what="remove after retry")
    else:
        assert res.stdout == f"message {qid} bounced to its sender and removed\n"
    wait_for(lambda: queue_ids(stuck) == [], what="queue empty")
    new = stuck.data / "domains" / "test.com" / "test" / "Maildir" / "new"
    [bounce] = wait_for(lambda: list(new.iterdir()), what="bounce delivered to the sender")
    text = bounce.read_text()
    assert "far@example.org" in text and "nobody is listening" in text


def test_remove_without_bounce_drops_silently(stuck):
    [qid] = wait_for(lambda: queue_ids(stuck), what="message queued")
    def removed():
        [(ok, lines)] = admin(stuck, f"queue remove {qid}\n")
        return ok and lines
    assert wait_for(removed, what="remove") == [f"message {qid} removed"]
    assert queue_ids(stuck) == []
    new = stuck.data / "domains" / "test.com" / "test" / "Maildir" / "new"
    assert list(new.iterdir()) == []
