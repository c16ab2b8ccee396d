"""The mail log an operator greps (issue 17), written by the real server: one connect and one
disconnect line per session, `new msg` with client IP, HELO, AUTH user and Message-ID, ids
in the 250 reply and the log that are never reused, each area written once, no Twisted
chatter, and every administrative change with who made it."""

from __future__ import annotations

import os
import pwd
import re
import smtplib

from tests.integration.opstools import log_text, wait_for

PASSWORD = "Passw0rd!"


def test_a_message_is_traced_from_its_client_to_its_delivery(make_server):
    srv = make_server('default_domain = "test.com"\n[submission]\nauth_plaintext_loopback = true\n')
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
    srv.start()
    replies = []
    with smtplib.SMTP("127.0.0.1", srv.port("submission"), timeout=30) as c:
        c.ehlo("client.example")
        c.login("test@test.com", PASSWORD)
        for n in range(3):     # delivered and removed one by one: inode numbers come back
            c.mail("test@test.com")
            c.rcpt("test@test.com")
            code, text = c.data(f"From: test@test.com\r\nMessage-ID: <m{n}@client.example>\r\n"
                                f"Subject: {n}\r\n\r\nbody\r\n".encode())
            assert code == 250
            replies.append(text.decode().split(" qp ")[1])
            wait_for(lambda: f"end msg {replies[-1]}" in log_text(srv), what="delivery")
    names = replies
    assert len(set(names)) == 3 and all(re.fullmatch(r"\d+\.[0-9a-f]{8}", n) for n in names)
    text = wait_for(lambda: "smtp: disconnect: " in log_text(srv) and log_text(srv),
                    what="the disconnect line")
    lines = text.splitlines()
    # One connect and one disconnect line for the session, same field order.
    connects = [l for l in lines if " smtp: connect: " in l]
    disconnects = [l for l in lines if " smtp: disconnect: " in l]
    assert len(connects) == 1 and connects[0].endswith("smtp: connect: rip=127.0.0.1 "
                                                       "kind=submission")
    assert len(disconnects) == 1 and re.search(
        r"smtp: disconnect: rip=127\.0\.0\.1 kind=submission messages=3 seconds=\d+\.\d$",
        disconnects[0])
    for n, name in enumerate(names):
        assert any(l.endswith(f" delivery: new msg {name}: rip=127.0.0.1 helo=client.example "
                              f"auth=test@test.com message-id=<m{n}@client.example>")
                   for l in lines), name
        # new msg, info msg, starting delivery, end msg: the same id all the way
        assert sum(1 for l in lines if re.search(rf"msg {re.escape(name)}(:| |$)", l)) == 4
    # Each event once, each area once, no Twisted port or factory chatter.
    assert len(set(lines)) == len(lines), text
    for line in lines:
        area = line.split(" ", 2)[1]
        assert not line.split(" ", 2)[2].startswith(area), line
    assert not any(re.search(r"starting on|Starting factory|Stopping factory|Port .* Closed|"
                             r"Starting protocol", l) for l in lines), text


def test_every_administrative_change_names_who_made_it(server):
    me = f"uid={os.getuid()}({pwd.getpwuid(os.getuid()).pw_name})"
    server.cli("domain", "add", "example.net")
    server.cli("user", "add", "joe@example.net", "--password-stdin", input=PASSWORD + "\n")
    server.cli("user", "passwd", "joe@example.net", "--password-stdin", input="N3w-pass!\n")
    server.cli("alias", "add", "sales@example.net", "joe@example.net")
    assert server.cli("user", "del", "nobody@example.net", check=False).returncode == 1
    server.cli("alias", "del", "sales@example.net")
    server.cli("user", "del", "joe@example.net")
    server.cli("domain", "del", "example.net")
    server.cli("domain", "list")
    expected = [f"admin: cli {me}: domain add example.net: ok",
                f"admin: cli {me}: user add joe@example.net: ok",
                f"admin: cli {me}: user passwd joe@example.net: ok",
                f"admin: cli {me}: alias add sales@example.net joe@example.net: ok",
                f"admin: cli {me}: user del nobody@example.net: refused: ",
                f"admin: cli {me}: alias del sales@example.net: ok",
                f"admin: cli {me}: user del joe@example.net: ok",
                f"admin: cli {me}: domain del example.net: ok"]
    text = wait_for(lambda: "domain del example.net: ok" in log_text(server) and
                    log_text(server), what="the change lines")
    got = [l.split(" ", 1)[1] for l in text.splitlines() if " admin: cli " in l][2:]
    # (the first two: the fixture's domain add test.com and user add test@test.com)
    assert len(got) == len(expected), got
    assert all(g.startswith(e) for g, e in zip(got, expected)), got
    assert PASSWORD not in text and "N3w-pass!" not in text
    # A change through the admin socket names the socket's peer, by the kernel's credentials.
    server.cli("queue", "remove", "12345", check=False)
    wait_for(lambda: f"admin: unix {me}: queue remove 12345: refused: " in log_text(server),
             what="the queue removal line")


def test_pop3_sessions_have_one_connect_and_one_disconnect_line(server):
    import poplib
    p = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    p.user("test@test.com")
    p.pass_(PASSWORD)
    p.quit()
    text = wait_for(lambda: "pop3: disconnect: " in log_text(server) and log_text(server),
                    what="the disconnect line")
    lines = [l.split(" ", 1)[1] for l in text.splitlines() if " pop3: " in l]
    assert [l for l in lines if "connect: " in l] == [
        "pop3: connect: rip=127.0.0.1 kind=pop3",
        next(l for l in lines if l.startswith("pop3: disconnect: "))]
    assert re.fullmatch(r"pop3: disconnect: rip=127\.0\.0\.1 kind=pop3 user=<test@test\.com> "
                        r"seconds=\d+\.\d", lines[-1]), lines
