"""Started as root with twistd --uid/--gid: ports bound as root, then every process id is the
unprivileged user's, and every file the server writes belongs to that user."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.integration import server as server_mod
from tests.integration.opstools import admin, wait_for

PASSWORD = "Dr0pped-Privs!"


def _other_can_traverse(path: Path) -> bool:
    """Whether a user with no special rights can reach `path` (every parent o+x, itself o+r)."""
    path = path.resolve()
    for parent in list(path.parents)[::-1]:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def _interpreter_for_unprivileged() -> tuple[str, dict]:
    """A Python the unprivileged user can run, with this environment's packages importable.

    The dev venv's interpreter may live under /root (mode 0700); the system python3 of the
    same minor version can load the venv's site-packages (same ABI)."""
    import site
    import twisted
    if _other_can_traverse(Path(sys.executable)) and _other_can_traverse(
            Path(twisted.__file__)):
        return sys.executable, {}
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system:
        version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
        if version == str(tuple(sys.version_info[:2])):
            paths = [str(Path(__file__).resolve().parents[2])] + site.getsitepackages()
            if all(_other_can_traverse(Path(p)) for p in paths):
                return system, {"PYTHONPATH": os.pathsep.join(paths)}
    return "", {}


@pytest.fixture
def unprivileged():
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the privilege drop test must run as root in CI (.ci/run runs as root)")
        pytest.skip("needs root to start the server with --uid/--gid")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.fail("no 'nobody' user on this machine")
    python, env = _interpreter_for_unprivileged()
    if not python:
        if IN_CI:
            pytest.fail("no Python interpreter the unprivileged user can run")
        pytest.skip("no Python interpreter the unprivileged user can run")
    root = Path(tempfile.mkdtemp(prefix="ma-privdrop-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield user, python, env, root
    shutil.rmtree(root, ignore_errors=True)


def _ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(x) for x in value.split()]
    return out


def free_low_port() -> int:
    """A port below 1024 nobody listens on now (binding it needs CAP_NET_BIND_SERVICE)."""
    import random
    import socket
    candidates = list(range(600, 1000))
    random.shuffle(candidates)
    for port in candidates:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise AssertionError("no free port below 1024")


def unit_capabilities() -> list[str]:
    unit = Path(__file__).resolve().parents[2] / "conf" / "mailappliance.service"
    for line in unit.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.split("=", 1)[1].split()
    raise AssertionError("no CapabilityBoundingSet in the unit")


def test_root_start_with_uid_gid_binds_then_runs_and_writes_as_the_user(unprivileged,
                                                                         monkeypatch):
    run_privdrop(unprivileged, monkeypatch)


def test_the_units_capability_bounding_set_and_no_new_privs_are_enough(unprivileged,
                                                                        monkeypatch):
    """Started the way systemd starts it: only the unit's capabilities, NoNewPrivileges, and
    a port below 1024 to bind."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if IN_CI:
            pytest.fail("setpriv (util-linux) is required in CI")
        pytest.skip("setpriv not installed")
    caps = ",".join(["-all"] + ["+" + c[len("CAP_"):].lower() for c in unit_capabilities()])
    run_privdrop(unprivileged, monkeypatch,
                 wrapper=[setpriv, f"--bounding-set={caps}", "--no-new-privs", "--"],
                 low_port=free_low_port())


def run_privdrop(unprivileged, monkeypatch, wrapper=(), low_port=None):
    user, python, env, root = unprivileged
    uid, gid = user.pw_uid, user.pw_gid
    monkeypatch.setattr(server_mod, "TWISTD", [*wrapper, python, *server_mod.TWISTD[1:]])
    config = 'default_domain = "test.com"\n[log]\nrotate_bytes = 4096\nkeep = 3\n'
    if low_port is not None:
        config += ("[listen]\nsmtp = [\"tcp:0:interface=127.0.0.1\"]\n"
                   "submission = [\"tcp:0:interface=127.0.0.1\"]\n"
                   f"pop3 = [\"tcp:{low_port}:interface=127.0.0.1\"]\n")
    srv = server_mod.ServerProcess(root / "srv", config, env=env,
                                   twistd_args=[f"--uid={uid}", f"--gid={gid}"])
    srv.root.mkdir()
    os.chmod(srv.root, 0o755)
    srv.data.mkdir()
    os.chown(srv.data, uid, gid)                  # the operator's install step (README)
    srv._write_config()
    os.chmod(srv.config_path, 0o644)

    def cli(*args, input=None):
        res = subprocess.run([python, "-m", "mailappliance.cli", "--config",
                              str(srv.config_path), *args], input=input, text=True,
                             capture_output=True, timeout=60, env={**os.environ, **env})
        assert res.returncode == 0, res.stderr
        return res

    # Run as root, the command acts as the data directory's owner.
    cli("domain", "add", "test.com")
    cli("user", "add", "test@test.com", "--password-stdin", input=PASSWORD + "\n")
    try:
        srv.start()
        ids = _ids(srv.proc.pid)
        assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [gid] * 4   # real, effective, saved, fs
        assert ids["Groups"] in ([], [gid])

        # mail in: SMTP to a local user, delivered into the Maildir by the dropped process
        with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=30) as s:
            s.sendmail("someone@example.org", ["test@test.com"],
                       b"Subject: privdrop\r\n\r\nhello\r\n")
        new = srv.data / "domains" / "test.com" / "test" / "Maildir" / "new"
        delivered = wait_for(lambda: list(new.iterdir()), what="delivery to the Maildir")
        assert all(os.stat(p).st_uid == uid for p in delivered)
        admin(srv, f"user add second@test.com\n{PASSWORD}\n", count=1)
        [(ok, _)] = admin(srv, "stat\n")
        assert ok
        if low_port is not None:
            assert srv.port("pop3") == low_port
        # a POP3 login reads the store from the thread pool, as the user
        import poplib
        pop = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=30)
        pop.user("test")
        pop.pass_(PASSWORD)
        assert pop.stat()[0] == 1
        pop.quit()

        # The sendmail command run as root writes the queue as the data owner, so the dropped
        # server can deliver (and remove) what it injected.
        res = subprocess.run([python, "-m", "mailappliance.sendmail", "--config",
                              str(srv.config_path), "test@test.com"],
                             input="Subject: from root's cron\n\nhello\n", text=True,
                             capture_output=True, timeout=60, env={**os.environ, **env})
        assert res.returncode == 0, res.stderr
        from_root = wait_for(lambda: [p for p in new.iterdir()
                                      if b"from root's cron" in p.read_bytes()],
                             what="delivery of the root-injected message")
        assert os.stat(from_root[0]).st_uid == uid

        # Every file and directory under the data directory belongs to the user.
        wrong = []
        for dirpath, dirnames, filenames in os.walk(srv.data):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = os.lstat(p)
                if st.st_uid != uid:
                    wrong.append((str(p), st.st_uid, st.st_gid))
        assert wrong == []
        for p in (srv.data / "log" / "current", srv.data / "run" / "ready.json",
                  srv.data / "admin.sock", srv.data / "users.sqlite"):
            assert os.stat(p).st_uid == uid, p
        # ready.json is written in startService: after the drop, before any input is read
        sock = os.stat(srv.data / "admin.sock")
        assert stat.S_IMODE(sock.st_mode) == 0o600
    finally:
        code = srv.stop()
    assert code in (0, -15), srv.output()
    assert "Traceback" not in srv.output(), srv.output()
