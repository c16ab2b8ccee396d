"""`mailappliance stat|queue|reload|relay` through the admin socket of the real server."""

from __future__ import annotations

import signal

from tests.integration.opstools import admin, wait_for


def test_stat_on_a_stopped_server_says_so_and_exits_1(make_server):
    srv = make_server()
    srv.root.mkdir(parents=True, exist_ok=True)
    srv._write_config()
    srv.cli("domain", "add", "test.com")          # an instance, never started
    res = srv.cli("stat", check=False)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr == (f"mailappliance: the server is not running (no admin socket at "
                          f"{srv.data / 'admin.sock'}: No such file or directory)\n")
    for args in (("queue", "list"), ("reload",), ("relay", "list")):
        res = srv.cli(*args, check=False)
        assert res.returncode == 1 and "the server is not running" in res.stderr


def test_stat_after_kill_9_says_not_running(server):
    server.kill()
    res = server.cli("stat", check=False)
    assert res.returncode == 1
    assert "the server is not running" in res.stderr and "Connection refused" in res.stderr


def test_stat_on_a_running_server(server):
    res = server.cli("stat")
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"mailappliance: up (pid {server.proc.pid}) ")
    assert lines[0].endswith("seconds, hostname mx.test.example")
    assert lines[1].startswith(f"config: {server.config_path}, loaded ")
    kinds = [l.split(":")[0] for l in lines if ": up " in l and "listening on" in l]
    assert kinds == ["smtp", "submission", "pop3", "admin"]
    smtp = next(l for l in lines if l.startswith("smtp: "))
    assert f"127.0.0.1:{server.port('smtp')}" in smtp
    assert "messages in queue: 0" in lines
    assert any(l.startswith("status: local 0/10 remote 0/20") for l in lines)
    assert res.stderr == ""


def test_stat_counts_connections(server):
    import socket
    conns = [socket.create_connection(("127.0.0.1", server.port("smtp")), timeout=10)
             for _ in range(3)]
    try:
        for c in conns:
            c.recv(512)                           # the greeting: the session is up

        def counted():
            out = server.cli("stat").stdout
            return next(l for l in out.splitlines() if l.startswith("smtp: "))
        line = wait_for(lambda: "connections 3 now" in counted() and counted(),
                        what="3 smtp connections counted")
        assert "3 total" in line
    finally:
        for c in conns:
            c.close()
    wait_for(lambda: "connections 0 now, 3 total" in server.cli("stat").stdout,
             what="closed connections uncounted")


def test_queue_relay_reload_commands(server):
    assert server.cli("queue", "list").stdout == "0 messages\n"
    assert server.cli("relay", "list").stdout == "0 grants\n"
    res = server.cli("queue", "remove", "424242", check=False)
    assert res.returncode == 1
    assert res.stderr == "mailappliance: message 424242: unknown (not in the queue)\n"
    res = server.cli("reload")
    assert res.stdout.splitlines()[0] == f"configuration reloaded from {server.config_path}"


def test_usage_errors_exit_2(server):
    res = server.cli("queue", "remove", check=False)
    assert res.returncode == 2


def test_store_commands_work_while_running_and_the_server_sees_them_at_once(server):
    server.cli("domain", "add", "live.test")
    server.cli("user", "add", "bob@live.test", "--password-stdin", input="B0b-secret!\n")
    assert admin(server, "user list live.test\n") == [(True, ["bob@live.test"])]
    server.cli("alias", "add", "team@live.test", "bob@live.test")
    [(ok, lines)] = admin(server, "alias list\n")
    assert "team@live.test -> bob@live.test" in lines


def test_smtp_sees_store_changes_by_the_cli_at_the_next_rcpt(server):
    """The server caches recipient lookups; a CLI change in another process still counts
    from the very next RCPT, whatever the server answered (and cached) before."""
    import smtplib
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as s:
        s.ehlo("cache.test")
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("carol@fresh.test")[0] == 553          # not our domain: cached "remote"
        server.cli("domain", "add", "fresh.test")
        assert s.rcpt("carol@fresh.test")[0] == 550          # ours now, no such user
        server.cli("user", "add", "carol@fresh.test", "--password-stdin",
                   input="C4rol-secret!\n")
        assert s.rcpt("carol@fresh.test")[0] == 250
        server.cli("user", "del", "carol@fresh.test")
        assert s.rcpt("carol@fresh.test")[0] == 550
        server.cli("domain", "del", "fresh.test")
        assert s.rcpt("carol@fresh.test")[0] == 553


def test_sighup_and_reload_keep_the_server_running(server):
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload (SIGHUP): configuration reloaded" in
             (server.data / "log" / "current").read_text(), what="SIGHUP reload logged")
    # A command answered after the reload: the reactor went on running, the process with it.
    assert server.cli("stat").returncode == 0
    assert server.proc.poll() is None


def test_loopback_tcp_admin_with_a_token(make_server):
    import socket
    from mailappliance.admin.protocol import ReplyReader
    srv = make_server()
    srv.root.mkdir(parents=True, exist_ok=True)
    token = srv.root / "admin.token"
    token.write_text("f00dfeedf00dfeedf00dfeedf00dfeed\n")
    token.chmod(0o600)
    srv.config_text = (f'[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\n'
                       "submission = []\npop3 = []\n"      # not the defaults' fixed ports
                       f'admin = ["tcp:0:interface=127.0.0.1"]\n'
                       f'[admin]\ntoken_file = "{token}"\n')
    srv.start()
    port = srv.port("admin")
    assert isinstance(port, int)
    assert not (srv.data / "admin.sock").exists()
    # the command finds the port in run/ready.json and authenticates with the token file
    res = srv.cli("stat")
    assert any(l.startswith(f"admin: up ") and f"127.0.0.1:{port}" in l
               for l in res.stdout.splitlines())

    def exchange(text: str) -> list:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(text.encode())
            reader = ReplyReader()
            while True:
                data = s.recv(65536)
                if not data:
                    return reader.replies
                reader.receive_data(data)

    assert exchange("stat\nquit\n") == [
        (False, ["error: authenticate first: auth, then the token on the next line"]),
        (True, ["bye"])]
    assert exchange("auth\nnot-the-token-at-all\nstat\n") == [
        (False, ["error: authentication failed"])]          # and the connection is closed
    token.write_text("0000000000000000000000000000000000\n")
    res = srv.cli("stat", check=False)
    assert res.returncode == 1
    assert res.stderr == "mailappliance: admin token refused: error: authentication failed\n"


def test_stat_shows_counters_since_start(server):
    """Commits, group commits, delivery results and DNS lookups, counted since start."""
    import re
    import smtplib

    def counters():
        out = server.cli("stat").stdout
        return {l.split(" since start:")[0]: l for l in out.splitlines() if " since start:" in l}

    before = counters()
    assert set(before) == {"queue", "deliveries", "dns", "failed logins", "tls handshakes",
                           "dnsbl"}
    assert before["failed logins"] == "failed logins since start: 0 smtp, 0 pop3"
    server.cli("domain", "add", "counted.test")
    server.cli("user", "add", "dana@counted.test", "--password-stdin", input="D4na-secret!\n")
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as s:
        s.sendmail("a@example.org", ["dana@counted.test"], b"Subject: counted\r\n\r\nhi\r\n")

    def delivered():
        m = re.search(r"deliveries since start: (\d+) success", counters()["deliveries"])
        b = re.search(r"deliveries since start: (\d+) success", before["deliveries"])
        return m and int(m.group(1)) == int(b.group(1)) + 1
    wait_for(delivered, what="the delivery counted")
    queue = counters()["queue"]
    committed = int(re.search(r"(\d+) messages committed", queue).group(1))
    old = int(re.search(r"(\d+) messages committed", before["queue"]).group(1))
    assert committed == old + 1 and "0 write errors" in queue
