"""The admin protocol against the real server over its real unix socket."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mailappliance.admin import protocol as ap
from tests.conftest import IN_CI, require_tool
from tests.integration.opstools import (admin, admin_connect, admin_path, read_replies,
                                        rss_kib, wait_for, wait_for_log)

PASSWORD = "Sock3t-Pass!"
# Memory a misbehaving admin client may cost the server, at most. The reply and line limits
# bound it to a few hundred KiB; the margin absorbs allocator noise.
RSS_GROWTH_LIMIT_KIB = 24 * 1024


def test_the_socket_is_private_to_the_owner(server):
    st = os.stat(admin_path(server))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


def test_every_command_over_the_socket(server):
    replies = admin(server, "help\n"
                            "stat\n"
                            "domain add example.net\n"
                            f"user add joe@example.net --quota 100000\n{PASSWORD}\n"
                            f"user passwd joe@example.net\n{PASSWORD}x\n"
                            "user list example.net\n"
                            "alias add sales@example.net joe@example.net\n"
                            "alias list\n"
                            "domain list\n"
                            "relay list\n"
                            "queue list\n"
                            "queue flush\n"
                            "queue remove 999999\n"
                            "reload\n"
                            "alias del sales@example.net\n"
                            "user del joe@example.net\n"
                            "domain del example.net\n"
                            "quit\n", count=18)
    by = [r for r in replies]
    assert by[0] == (True, ap.help_lines())
    ok, stat_lines = by[1]
    assert ok and stat_lines[0].startswith("mailappliance: up (pid ")
    assert any(l.startswith("admin: up ") and str(admin_path(server)) in l for l in stat_lines)
    assert any(l.startswith("smtp: up ") and "127.0.0.1:" in l for l in stat_lines)
    assert by[2] == (True, ["domain example.net added"])
    assert by[3] == (True, ["user joe@example.net added"])
    assert by[4] == (True, ["password of joe@example.net changed"])
    assert by[5] == (True, ["joe@example.net quota=100000"])
    assert by[6] == (True, ["alias sales@example.net added"])
    assert "sales@example.net -> joe@example.net" in by[7][1]
    assert by[8] == (True, ["example.net", "test.com"])
    assert by[9] == (True, ["0 grants"])
    assert by[10] == (True, ["0 messages"])
    assert by[11][0] is True and by[11][1][0].endswith("scheduled for delivery now")
    assert by[12] == (False, ["error: message 999999: unknown (not in the queue)"])
    assert by[13][0] is True and by[13][1][0].startswith("configuration reloaded from ")
    assert by[14] == (True, ["alias sales@example.net deleted"])
    assert by[15] == (True, ["user joe@example.net deleted"])
    assert by[16] == (True, ["domain example.net deleted"])
    assert by[17] == (True, ["bye"])
    # the password went nowhere: not in any log, not on the server's output
    text = wait_for_log(server, "user add joe@example.net --quota 100000: ok")
    assert PASSWORD not in text and PASSWORD not in server.output()


def test_a_change_made_over_the_socket_is_seen_by_the_cli_and_back(server):
    admin(server, "domain add shared.test\n")
    res = server.cli("domain", "list")
    assert "shared.test" in res.stdout.split()
    server.cli("user", "add", "amy@shared.test", "--password-stdin", input=PASSWORD + "\n")
    assert admin(server, "user list shared.test\n") == [(True, ["amy@shared.test"])]


def test_malformed_input_gets_clear_errors_and_the_session_survives(server):
    replies = admin(server, "frobnicate\n"
                            "user\n"
                            "queue remove abc\n"
                            "stat \xff\n"
                            "\x00\x01\n"
                            "help\n", count=6)
    assert replies[0] == (False, ["error: unknown command 'frobnicate'; try help"])
    assert replies[1] == (False, ["error: user: expected one of add, del, list, passwd"])
    assert replies[2] == (False, ["error: queue remove: ID: a queue id is a number, or "
                                  "number.hex as the log shows it"])
    assert replies[3] == (False, ["error: unknown command 'stat'; try help"]) or \
        replies[3][0] is False
    assert replies[4] == (False, ["error: control characters in command line"])
    assert replies[5][0] is True


def test_a_huge_line_costs_bounded_memory_and_gets_one_error(server):
    pid = server.proc.pid
    admin(server, "stat\n")
    before = rss_kib(pid)
    with admin_connect(server) as s:
        chunk = b"A" * 65536
        for _ in range(800):                    # 50 MiB without a newline
            s.sendall(chunk)
        s.sendall(b"\nhelp\n")
        replies = read_replies(s, 2)
    assert replies[0] == (False, [f"error: line too long (limit {ap.MAX_LINE} octets)"])
    assert replies[1] == (True, ap.help_lines())
    assert rss_kib(pid) - before < RSS_GROWTH_LIMIT_KIB


def test_a_client_that_never_reads_costs_bounded_memory_and_others_are_served(server):
    pid = server.proc.pid
    admin(server, "stat\n")
    before = rss_kib(pid)
    hog = admin_connect(server)
    hog.setblocking(False)
    request = b"help\n" * 1000
    sent = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and sent < 40 * 1024 * 1024:
        try:
            sent += hog.send(request)
        except BlockingIOError:
            time.sleep(0.01)            # both socket buffers full: the server stopped reading
    # The server stopped reading long before 40 MiB of commands (each would answer ~1.5 KiB).
    assert sent < 40 * 1024 * 1024
    # Another client is served while the hog's replies wait (admin() has its own timeout).
    [(ok, lines)] = admin(server, "stat\n")
    assert ok
    assert rss_kib(pid) - before < RSS_GROWTH_LIMIT_KIB
    hog.close()
    # The hog's connection goes away and the count of open admin connections comes back down.
    def settled():
        [(ok, lines)] = admin(server, "stat\n")
        line = next(l for l in lines if l.startswith("admin: "))
        return "connections 1 now" in line
    wait_for(settled, what="hog connection closed")


def test_socat_drives_it_like_a_person(server):
    socat = require_tool("socat")
    res = subprocess.run([socat, "-t", "5", "-", f"UNIX-CONNECT:{admin_path(server)}"],
                         input="stat\nquit\n", capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("mailappliance: up (pid ")
    assert lines[-2:] == ["bye", "."]


def test_a_stale_socket_after_kill_9_does_not_stop_the_restart(server):
    path = admin_path(server)
    server.kill()
    assert path.exists()                        # kill -9 leaves the socket file behind
    server.start()
    assert admin(server, "domain list\n") == [(True, ["test.com"])]


def test_a_second_server_cannot_steal_a_live_socket(server, make_server):
    twin = make_server(server.config_text, name="twin")
    twin.config_path = server.config_path      # same instance, same admin socket
    t0 = time.monotonic()
    try:
        twin.start()
    except RuntimeError as e:
        assert f"another server (pid {server.proc.pid}) is running on {server.data}" in str(e)
    else:
        raise AssertionError("a second server started on a live admin socket")
    assert time.monotonic() - t0 < 15
    assert admin(server, "domain list\n") == [(True, ["test.com"])]
    assert (server.data / "run" / "ready.json").exists()     # the twin touched nothing


def test_socket_group_opens_the_socket_to_that_group_only(make_server):
    import grp
    group = grp.getgrgid(65534).gr_name if 65534 in [g.gr_gid for g in grp.getgrall()] \
        else grp.getgrgid(os.getgid()).gr_name
    srv = make_server(f'[admin]\nsocket_group = "{group}"\n').start()
    st = os.stat(admin_path(srv))
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam(group).gr_gid
    assert admin(srv, "relay list\n") == [(True, ["0 grants"])]


def test_a_world_accessible_socket_mode_or_unknown_group_stops_start_up(make_server):
    for name, cfg, text in (
            ("mode", "[admin]\nsocket_mode = 0o666\n",
             "mailappliance: admin.socket_mode: 666 lets every local user in; use 600 or 660 "
             "with admin.socket_group"),
            ("group", '[admin]\nsocket_group = "no-such-group-here"\n',
             "mailappliance: admin.socket_group: no such group: no-such-group-here")):
        srv = make_server(cfg, name=name)
        try:
            srv.start()
        except RuntimeError as e:
            assert text in str(e)
            assert "Traceback" not in str(e)
        else:
            raise AssertionError(f"started with {cfg!r}")


def test_socket_group_members_reach_the_socket_in_a_runtime_directory_like_the_units(
        make_server, request):
    """The systemd unit's layout: the admin socket in a runtime directory of mode 0755
    (RuntimeDirectoryMode=), the socket 0660 for [admin] socket_group. A member of that group
    who is neither root nor the server's user drives it with socat; any other user is kept out
    by the socket's own mode."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI runs as root: the test runs socat as other users")
        pytest.skip("needs root to run socat as other users")
    socat = require_tool("socat")
    member, outsider = pwd.getpwnam("daemon"), pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="ma-runtime-", dir="/tmp"))  # (tmp_path is root's 0700)
    request.addfinalizer(lambda: shutil.rmtree(top, ignore_errors=True))
    runtime = top / "mailappliance"
    runtime.mkdir()
    for d in (top, runtime):
        os.chmod(d, 0o755)
    sock = runtime / "admin.sock"
    srv = make_server(f'[admin]\nsocket_group = "daemon"\n[listen]\n'
                      'smtp = ["tcp:0:interface=127.0.0.1"]\nsubmission = []\npop3 = []\n'
                      f'admin = ["unix:{sock}"]\n').start()
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660

    def as_user(user):
        return subprocess.run([socat, "-t", "5", "-", f"UNIX-CONNECT:{sock}"], input="stat\n",
                              capture_output=True, text=True, timeout=30, user=user.pw_uid,
                              group=user.pw_gid, extra_groups=[], cwd="/")
    res = as_user(member)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("mailappliance: up (pid ")
    assert res.stdout.splitlines()[-1] == "."
    res = as_user(outsider)
    assert res.returncode != 0 and "Permission denied" in res.stderr, res
    assert srv.proc.poll() is None
