"""The tools an operator uses to see why (issue 17): `stat --json`, `--version`, the queue
commands, against the real server over its admin socket."""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import sys

import pytest

import mailappliance
from tests.integration.delivery_support import closed_port
from tests.integration.opstools import log_text, wait_for


def test_version_prints_the_package_version():
    res = subprocess.run([sys.executable, "-m", "mailappliance.cli", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert res.stdout == f"mailappliance {mailappliance.__version__}\n"


def test_stat_json_is_one_document_matching_stat(server):
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30) as c:
        c.sendmail("a@example.org", ["test@test.com"], b"Subject: s\r\n\r\nbody\r\n")
    res = server.cli("stat", "--json")
    doc = json.loads(res.stdout)
    assert doc["pid"] == server.proc.pid
    assert doc["hostname"] == "mx.test.example"
    kinds = {s["kind"]: s for s in doc["services"]}
    assert list(kinds) == ["smtp", "submission", "pop3", "admin"]
    assert kinds["smtp"]["connections_total"] == 1
    assert kinds["smtp"]["addresses"] == [f"127.0.0.1:{server.port('smtp')}"]
    # Every kind counts its connections: never "not counted".
    assert all(isinstance(s["connections_now"], int) for s in doc["services"])
    assert doc["queue"]["local_max"] == 10 and doc["queue"]["remote_max"] == 20
    assert doc["counters"]["queue"]["commits"] == 1
    assert set(doc["counters"]["deliveries"]) >= {"success", "deferral", "failure"}
    assert "not counted" not in server.cli("stat").stdout


# --- the queue commands ----------------------------------------------------------------------


@pytest.fixture
def queue_server(make_server):
    """Relays for 127.0.0.1; example.org is routed to a closed port (every delivery defers
    with "Connection refused"), hang.example to a listener that never says a word (its
    delivery stays in progress)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    srv = make_server()
    srv.root.mkdir(parents=True, exist_ok=True)
    rules = srv.root / "tcp.smtp"
    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n')
    srv.closed_port = closed_port()
    srv.config_text = (f'default_domain = "test.com"\n[smtp]\nrules = "{rules}"\n'
                       f'[routes]\n"example.org" = "127.0.0.1:{srv.closed_port}"\n'
                       f'"hang.example" = "127.0.0.1:{silent.getsockname()[1]}"\n')
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.start()
    yield srv
    silent.close()


def send(srv, rcpts, n=0) -> str:
    """One message; returns the queue id of the 250 reply (the log's id)."""
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as c:
        c.ehlo("client.example")
        c.mail("sender@test.com")
        for r in rcpts:
            c.rcpt(r)
        code, text = c.data(f"Message-ID: <q{n}@client.example>\r\nSubject: queued {n}\r\n"
                            f"\r\nbody\r\n".encode())
    assert code == 250
    return text.decode().split(" qp ")[1]


def listed(srv, *args) -> list[dict]:
    res = srv.cli("queue", "list", "--json", *args)
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_queue_list_json_shows_state_attempts_and_the_last_error_with_host_and_errno(
        queue_server):
    qid = send(queue_server, ["far@example.org", "near@example.org"])
    msgs = wait_for(lambda: [m for m in listed(queue_server)
                             if all(r["attempts"] == 1 for r in m["recipients"])],
                    what="the first attempt recorded")
    [m] = msgs
    assert m["id"] == qid and m["sender"] == "sender@test.com"
    assert m["received_from"] == ("rip=127.0.0.1 helo=client.example auth=- "
                                  "message-id=<q0@client.example>")
    assert [r["address"] for r in m["recipients"]] == ["far@example.org", "near@example.org"]
    for r in m["recipients"]:
        assert r["state"] == "deferred" and r["attempts"] == 1 and r["last_try"] > 0
        assert r["last_error"] == (
            "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
            f"127.0.0.1:{queue_server.closed_port}: Connection refused (errno 111)")
    assert m["next_try"] > m["arrival"]


def test_queue_show_gives_envelope_states_and_header(queue_server):
    qid = send(queue_server, ["far@example.org"])
    wait_for(lambda: listed(queue_server)[0]["recipients"][0]["attempts"] == 1,
             what="the first attempt recorded")
    out = queue_server.cli("queue", "show", qid).stdout.splitlines()
    assert out[0] == f"id: {qid}"
    assert "sender: <sender@test.com>" in out
    assert ("received from: rip=127.0.0.1 helo=client.example auth=- "
            "message-id=<q0@client.example>") in out
    i = out.index("recipients:")
    assert re.fullmatch(r"  deferred  far@example\.org  attempts 1, last \S+ ago", out[i + 1])
    assert out[i + 2].startswith("      last error: Sorry, I wasn't able to establish")
    header = out[out.index("header:") + 1:]
    assert "  Subject: queued 0" in header and "  Message-ID: <q0@client.example>" in header
    assert header[0].startswith("  Received: from ")
    res = queue_server.cli("queue", "show", "999999999", check=False)
    assert res.returncode == 1
    assert res.stderr == "mailappliance: message 999999999: unknown (not in the queue)\n"


def test_queue_flush_all_one_message_or_one_domain(queue_server):
    qid = send(queue_server, ["far@example.org"])
    wait_for(lambda: listed(queue_server)[0]["recipients"][0]["attempts"] == 1,
             what="the first attempt")
    assert queue_server.cli("queue", "flush", qid).stdout == \
        f"message {qid} scheduled for delivery now\n"
    wait_for(lambda: listed(queue_server)[0]["recipients"][0]["attempts"] == 2,
             what="the flushed retry")
    assert queue_server.cli("queue", "flush", "@Example.ORG").stdout == \
        "1 deferred messages with recipients at example.org scheduled for delivery now\n"
    wait_for(lambda: listed(queue_server)[0]["recipients"][0]["attempts"] == 3,
             what="the domain's retry")
    assert queue_server.cli("queue", "flush", "@other.example").stdout.startswith("0 ")
    res = queue_server.cli("queue", "flush", "12345.0000abcd", check=False)
    assert res.returncode == 1 and "unknown" in res.stderr


def test_queue_remove_several_ids_says_unknown_and_in_delivery(queue_server):
    a = send(queue_server, ["far@example.org"], 1)
    b = send(queue_server, ["far@example.org"], 2)
    hung = send(queue_server, ["x@hang.example"], 3)
    wait_for(lambda: any(r["state"] == "delivering"
                         for m in listed(queue_server) if m["id"] == hung
                         for r in m["recipients"]), what="the silent host's delivery")
    res = queue_server.cli("queue", "remove", a, b)
    assert res.stdout == f"message {a} removed\nmessage {b} removed\n"
    res = queue_server.cli("queue", "remove", hung, check=False)
    assert res.returncode == 1
    assert res.stderr == (f"mailappliance: message {hung}: a delivery of it is in progress; "
                          "try again when it ends\n")
    res = queue_server.cli("queue", "remove", a, check=False)
    assert res.returncode == 1
    assert res.stderr == f"mailappliance: message {a}: unknown (not in the queue)\n"
    assert [m["id"] for m in listed(queue_server)] == [hung]
    # The removal is in the log with who asked.
    wait_for(lambda: re.search(rf"admin: unix uid=\d+\(\w+\): queue remove {re.escape(a)} "
                               rf"{re.escape(b)}: ok", log_text(queue_server)),
             what="the removal line")
    # A plain number (the inode part of the id) names the message too; an unknown one is
    # refused the same way.
    c = send(queue_server, ["far@example.org"], 4)
    # (its first attempt, to the refusing port, may be in flight for a moment)
    res = wait_for(lambda: (lambda r: r.returncode == 0 and r)(
        queue_server.cli("queue", "remove", c.split(".")[0], check=False)),
        what="the removal by number")
    assert res.stdout == f"message {c} removed\n", res.stdout
    res = queue_server.cli("queue", "remove", "999999999", check=False)
    assert res.returncode == 1
    assert res.stderr == "mailappliance: message 999999999: unknown (not in the queue)\n"


def test_queue_list_pages(queue_server):
    ids = sorted((send(queue_server, ["far@example.org"], n) for n in range(5)),
                 key=lambda q: int(q.split(".")[0]))
    wait_for(lambda: len(listed(queue_server)) == 5, what="5 messages")
    out = queue_server.cli("queue", "list", "--limit", "2").stdout.splitlines()
    firsts = [l.split()[0] for l in out if l[:1].isdigit() and " bytes " in l]
    assert firsts == ids[:2]
    assert out[-2:] == [f"... 3 more messages: queue list --after {ids[1].split('.')[0]}",
                        "5 messages"]
    nxt = queue_server.cli("queue", "list", "--limit", "2", "--after", ids[1]).stdout
    assert [l.split()[0] for l in nxt.splitlines() if " bytes " in l] == ids[2:4]
    every = queue_server.cli("queue", "list", "--limit", "2", "--all").stdout.splitlines()
    assert [l.split()[0] for l in every if " bytes " in l] == ids
    assert every[-1] == "5 messages" and not any(l.startswith("... ") for l in every)
    assert [m["id"] for m in listed(queue_server, "--limit", "2", "--all")] == ids
    assert [m["id"] for m in listed(queue_server, "--limit", "2")] == ids[:2]
