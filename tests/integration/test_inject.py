"""`[listen] inject` through the real server, with `mailappliance-sendmail` run as a user who
may not write the queue (`nobody`), as a web application or a cron job would run it; and
instance discovery: sendmail never writes where no server reads.

The server runs as root here (its data directory is root's, mode 0700), so `nobody` has no
way in but the socket: its message arrives with its uid and name in the Received: line; with
the server stopped it gets exit 75 and one line, while root still injects into the queue."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.integration.opstools import admin, wait_for
from tests.integration.server import ServerProcess
from tests.integration.test_privdrop import _interpreter_for_unprivileged

SENDMAIL_TIMEOUT = 60


@pytest.fixture
def nobody():
    """(passwd entry, python it can run, env for that python, a root dir it can traverse)."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the inject tests must run as root in CI (.ci/run runs as root)")
        pytest.skip("needs root to run the sendmail command as another user")
    user = pwd.getpwnam("nobody")
    python, env = _interpreter_for_unprivileged()
    if not python:
        if IN_CI:
            pytest.fail("no Python interpreter the unprivileged user can run")
        pytest.skip("no Python interpreter the unprivileged user can run")
    root = Path(tempfile.mkdtemp(prefix="ma-inject-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield user, python, env, root
    shutil.rmtree(root, ignore_errors=True)


def start_server(root: Path, extra: str = "") -> ServerProcess:
    sock = root / "run" / "inject.sock"
    config = ('default_domain = "test.com"\n' + extra +
              "[listen]\n"
              'smtp = ["tcp:0:interface=127.0.0.1"]\n'
              'submission = []\npop3 = []\n'
              f'inject = ["unix:{sock}"]\n')
    srv = ServerProcess(root / "srv", config)
    srv.root.mkdir()
    os.chmod(srv.root, 0o755)
    srv._write_config()
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    os.chmod(srv.data, 0o700)                   # nobody may not write (or read) the queue
    return srv


def sendmail(python, env, *args, user=None, input=b"Subject: hi\n\nhello\n", extra_env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MAILAPPLIANCE_")}
    full.update(env)
    full.update(extra_env or {})
    return subprocess.run([python, "-m", "mailappliance.sendmail", *args], input=input,
                          capture_output=True, timeout=SENDMAIL_TIMEOUT, env=full, cwd="/",
                          user=user, group=None if user is None else pwd.getpwuid(user).pw_gid,
                          extra_groups=None if user is None else [])


def send_marked(srv, python, env, tag: str, subject: str, user=None) -> str:
    """`mailappliance-sendmail --config ... test@test.com` (as `user`) with a message carrying
    a unique marker; it must exit 0 and say nothing. -> the marker."""
    marker = f"{tag}-{time.monotonic_ns()}"
    res = sendmail(python, env, "--config", str(srv.config_path), "test@test.com", user=user,
                   input=f"Subject: {subject}\n\n{marker}\n".encode())
    assert (res.returncode, res.stderr) == (0, b""), res.stderr
    return marker


def delivered(srv, marker: str) -> bytes:
    new = srv.data / "domains" / "test.com" / "test" / "Maildir" / "new"
    hits = wait_for(lambda: [p for p in new.iterdir() if marker.encode() in p.read_bytes()],
                    what=f"delivery of {marker}")
    return hits[0].read_bytes()


def queue_files(srv) -> list[str]:
    found = []
    for top in (srv.data / "queue" / "mess", srv.data / "queue" / "tmp"):
        for dirpath, _, files in os.walk(top):
            found += [os.path.join(dirpath, f) for f in files]
    return sorted(found)


def test_a_user_who_cannot_write_the_queue_sends_through_the_socket(nobody):
    user, python, env, root = nobody
    srv = start_server(root)
    os.chmod(srv.config_path, 0o644)            # readable: its [listen] inject is used
    try:
        srv.start()
        sock = root / "run" / "inject.sock"
        assert oct(os.stat(sock).st_mode & 0o777) == "0o666"
        marker = send_marked(srv, python, env, "from-nobody", "web app", user=user.pw_uid)
        data = delivered(srv, marker)
        head = data.split(b"\n\n", 1)[0]
        assert (f"Received: (mailappliance-sendmail invoked by uid {user.pw_uid} (nobody) "
                "via the inject socket); ").encode() in head
        assert b"Return-Path: <nobody@test.com>" in head
        assert f"inject: uid {user.pw_uid} (nobody): new msg".encode() in \
            srv.output().encode()
        [(ok, lines)] = admin(srv, "stat\n")
        assert ok and any(line.lstrip().startswith("inject") for line in lines), lines

        # The configuration unreadable for nobody: MAILAPPLIANCE_CONFIG names it, and
        # MAILAPPLIANCE_INJECT says where the socket is (default /run/mailappliance/...).
        os.chmod(srv.config_path, 0o600)
        marker = f"unreadable-config-{time.monotonic_ns()}"
        res = sendmail(python, env, "-t", user=user.pw_uid,
                       input=f"To: test@test.com\n\n{marker}\n".encode(),
                       extra_env={"MAILAPPLIANCE_CONFIG": str(srv.config_path),
                                  "MAILAPPLIANCE_INJECT": str(sock)})
        assert (res.returncode, res.stderr) == (0, b""), res.stderr
        assert b"uid 65534 (nobody) via the inject socket" in delivered(srv, marker)

        # A message over the server's databytes: 65; nothing is queued.
        os.chmod(srv.config_path, 0o644)
        res = sendmail(python, env, "--config", str(srv.config_path), "test@test.com",
                       user=user.pw_uid, input=b"Subject: big\n\n" + b"x" * 11_000_000)
        assert res.returncode == 65, res.stderr
    finally:
        srv.stop()


def test_with_the_server_down_nobody_gets_75_and_root_injects_directly(nobody):
    user, python, env, root = nobody
    srv = start_server(root)
    os.chmod(srv.config_path, 0o644)
    srv.start()
    srv.stop()
    before = queue_files(srv)
    res = sendmail(python, env, "--config", str(srv.config_path), "test@test.com",
                   user=user.pw_uid)
    assert res.returncode == 75, res.stderr
    line = res.stderr.decode()
    assert line.count("\n") == 1 and line.startswith("mailappliance-sendmail: the server is "
                                                     "not running")
    assert "uid 65534 may not write" in line
    assert queue_files(srv) == before                 # nothing written anywhere

    marker = send_marked(srv, python, env, "root-direct", "cron")
    queued = [p for p in queue_files(srv) if marker.encode() in Path(p).read_bytes()]
    assert len(queued) == 1
    assert b"invoked by uid 0 (root)); " in Path(queued[0]).read_bytes()
    srv.start()                                       # the server delivers it
    delivered(srv, marker)
    srv.stop()


def test_sendmail_without_an_instance_exits_78_and_writes_nothing(tmp_path):
    """Run from a directory with no instance and no configuration anywhere: 78, one line
    naming what it looked for, and no ./var created (it used to queue there, unread)."""
    if Path("/etc/mailappliance/mailappliance.toml").exists():
        pytest.skip("this machine has a system configuration")
    work = tmp_path / "webapp"
    work.mkdir()
    (work / "var").mkdir()                             # the application's own var/: no instance
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILAPPLIANCE_")}
    for argv in ([sys.executable, "-m", "mailappliance.sendmail", "root@test.com"],
                 [sys.executable, "-m", "mailappliance.cli", "sendmail", "root@test.com"]):
        res = subprocess.run(argv, input=b"Subject: x\n\ny\n", capture_output=True, cwd=work,
                             env=env, timeout=SENDMAIL_TIMEOUT)
        assert res.returncode == 78, res.stderr
        err = res.stderr.decode()
        assert err.count("\n") == 1
        for looked in ("--config", "MAILAPPLIANCE_CONFIG",
                       "/etc/mailappliance/mailappliance.toml", "./var"):
            assert looked in err, err
    assert sorted(os.listdir(work)) == ["var"] and os.listdir(work / "var") == []
    # --data naming a directory without an instance, or a configuration whose data directory
    # is missing: the same refusal, nothing created.
    res = subprocess.run([sys.executable, "-m", "mailappliance.sendmail", "--data",
                          str(tmp_path / "nothing"), "r@test.com"], input=b"x\n",
                         capture_output=True, env=env, timeout=SENDMAIL_TIMEOUT)
    assert res.returncode == 78 and not (tmp_path / "nothing").exists(), res.stderr
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'data = "{tmp_path / "missing"}"\n')
    res = subprocess.run([sys.executable, "-m", "mailappliance.sendmail", "r@test.com"],
                         input=b"x\n", capture_output=True, timeout=SENDMAIL_TIMEOUT,
                         env={**env, "MAILAPPLIANCE_CONFIG": str(cfg)})
    assert res.returncode == 78 and not (tmp_path / "missing").exists(), res.stderr
    assert b"no mailappliance instance in" in res.stderr


def test_admin_commands_find_the_instance_the_same_way(tmp_path):
    """`mailappliance` without options: MAILAPPLIANCE_CONFIG, then ./var; a command that does
    not create an instance refuses with 78 where there is none."""
    if Path("/etc/mailappliance/mailappliance.toml").exists():
        pytest.skip("this machine has a system configuration")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILAPPLIANCE_")}

    def cli(*args, cwd=tmp_path, extra=None):
        return subprocess.run([sys.executable, "-m", "mailappliance.cli", *args],
                              capture_output=True, text=True, cwd=cwd, timeout=60,
                              env={**env, **(extra or {})})

    for args in (("domain", "list"), ("user", "list"), ("stat",), ("queue", "list"),
                 ("domain", "del", "test.com"), ("user", "del", "a@test.com")):
        res = cli(*args)
        assert res.returncode == 78, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "looked for --config" in res.stderr
    assert not (tmp_path / "var").exists()
    assert cli("domain", "add", "test.com").returncode == 0       # creates ./var
    assert cli("domain", "list").stdout == "test.com\n"
    other = tmp_path / "elsewhere"
    other.mkdir()
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'data = "{tmp_path / "var"}"\n')
    assert cli("domain", "list", cwd=other).returncode == 78
    res = cli("domain", "list", cwd=other, extra={"MAILAPPLIANCE_CONFIG": str(cfg)})
    assert (res.returncode, res.stdout) == (0, "test.com\n"), res.stderr


def test_sendmail_asks_a_busy_server_again(tmp_path):
    """A server at its connection limit answers "75 busy" instead of its greeting; the
    command asks again (here the second try is greeted and the message accepted). A stand-in
    server on a unix socket, so the test needs no 33 stuck clients."""
    import io
    import threading
    from mailappliance import sendmail as sm
    from mailappliance.pickup import core
    sock_path = str(tmp_path / "inject.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(4)
    seen = []

    def serve():
        for n in range(2):
            conn, _ = listener.accept()
            with conn:
                if n == 0:
                    conn.sendall(core.encode_reply(75, "busy: 32 injections in progress"))
                    continue
                conn.sendall(core.greeting(1000))
                data = b""
                while b"\n" not in data:
                    data += conn.recv(4096)
                line, rest = data.split(b"\n", 1)
                req = core.parse_request(line)
                while len(rest) < req.size:
                    rest += conn.recv(4096)
                seen.append((req, rest))
                conn.sendall(core.encode_reply(0, "queued as 42"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    err = io.StringIO()
    code = sm.main(["-f", "cron@test.com", "a@test.com"], stdin=io.BytesIO(b"Subject: x\n\nhi\n"),
                   stderr=err, environ={"MAILAPPLIANCE_INJECT": sock_path})
    thread.join(SENDMAIL_TIMEOUT)
    listener.close()
    assert (code, err.getvalue()) == (0, "")
    [(req, body)] = seen
    assert req.sender == "cron@test.com" and req.recipients == ("a@test.com",)
    assert body == b"Subject: x\n\nhi\n" and req.head == len(b"Subject: x\n\n")


def test_inject_under_a_privilege_drop_and_a_config_without_a_socket(nobody, monkeypatch):
    """Started as root with --uid nobody (the production way): the socket is bound as root
    before the drop and still names its callers (here `daemon`), and the dropped server writes
    the queue. A readable configuration without [listen] inject leaves a user who may not write
    the queue no way in: exit 78 naming the missing key."""
    from tests.integration import server as server_mod
    user, python, env, root = nobody
    caller = pwd.getpwnam("daemon")
    monkeypatch.setattr(server_mod, "TWISTD", [python, *server_mod.TWISTD[1:]])
    sock = root / "run" / "inject.sock"
    srv = ServerProcess(root / "srv", 'default_domain = "test.com"\n[listen]\n'
                        'smtp = ["tcp:0:interface=127.0.0.1"]\nsubmission = []\npop3 = []\n'
                        f'inject = ["unix:{sock}"]\n', env=env,
                        twistd_args=[f"--uid={user.pw_uid}", f"--gid={user.pw_gid}"])
    srv.root.mkdir()
    os.chmod(srv.root, 0o755)
    srv.data.mkdir(mode=0o700)
    os.chown(srv.data, user.pw_uid, user.pw_gid)
    srv._write_config()
    os.chmod(srv.config_path, 0o644)
    srv.cli("domain", "add", "test.com")
    srv.cli("user", "add", "test@test.com", "--password-stdin", input="Passw0rd!\n")
    try:
        srv.start()
        marker = send_marked(srv, python, env, "under-uid", "d", user=caller.pw_uid)
        data = delivered(srv, marker)
        assert b"invoked by uid 1 (daemon) via the inject socket" in data
        new = srv.data / "domains" / "test.com" / "test" / "Maildir" / "new"
        assert all(os.stat(p).st_uid == user.pw_uid for p in new.iterdir())
        assert os.stat(srv.data / "queue" / "mess").st_uid == user.pw_uid
    finally:
        srv.stop()
    plain = srv.config_path.read_text().replace(f'inject = ["unix:{sock}"]\n', "")
    srv.config_path.write_text(plain)
    res = sendmail(python, env, "--config", str(srv.config_path), "test@test.com",
                   user=caller.pw_uid)
    assert res.returncode == 78, res.stderr
    assert b"no [listen] inject socket in --config" in res.stderr
    assert res.stderr.count(b"\n") == 1


def test_a_tls_key_the_caller_cannot_read_does_not_stop_sendmail(nobody):
    """The production layout: [tls] key readable only by root and the server. A web
    application's sendmail reads the configuration for its [listen] inject and must not trip
    over the key (it used to fail with a misleading "not a PEM private key"); with the server
    down it gets the one 75 line, not a TLS error."""
    from tests.pop3_support import make_cert
    user, python, env, root = nobody
    tls = root / "tls"
    tls.mkdir()
    os.chmod(tls, 0o755)
    cert, key = make_cert(tls)
    os.chmod(cert, 0o644)
    os.chmod(key, 0o600)                        # root only
    srv = start_server(root, f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    os.chmod(srv.config_path, 0o644)
    try:
        srv.start()
        marker = send_marked(srv, python, env, "unreadable-key", "k", user=user.pw_uid)
        delivered(srv, marker)
    finally:
        srv.stop()
    res = sendmail(python, env, "--config", str(srv.config_path), "test@test.com",
                   user=user.pw_uid)
    assert res.returncode == 75, res.stderr
    assert res.stderr.count(b"\n") == 1 and b"PEM" not in res.stderr and b"tls" not in res.stderr
