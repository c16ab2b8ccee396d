"""`mailappliance check` as an operator runs it before a start: a sound production-like
configuration passes (exit 0); each problem is one line and exit 1 -- a key the server's user
cannot read, a key of another certificate, a bad rules line, a data directory of the wrong
owner or open to all, two listeners on one port, an alias shadowed by a user. A key the
running user may not read says "Permission denied", not "not a PEM private key"."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.integration.test_inject import nobody  # noqa: F401  (the fixture)
from tests.unit.test_ops_conf import self_signed

CONF = Path(__file__).resolve().parents[2] / "conf"


def setup_instance(root: Path, user) -> Path:
    """A production-like instance under `root`: conf/ files, TLS key 0640 root:<user's group>,
    data directory 0700 owned by the user, made with the real command."""
    etc = root / "etc"
    etc.mkdir()
    os.chmod(etc, 0o755)
    self_signed(etc)
    os.chmod(etc / "cert.pem", 0o644)
    os.chown(etc / "key.pem", 0, user.pw_gid)
    os.chmod(etc / "key.pem", 0o640)
    shutil.copy(CONF / "tcp.smtp", etc / "tcp.smtp")
    os.chmod(etc / "tcp.smtp", 0o644)
    data = root / "data"
    data.mkdir(mode=0o700)
    os.chown(data, user.pw_uid, user.pw_gid)
    text = (CONF / "mailappliance.toml").read_text()
    text = text.replace("/etc/mailappliance", str(etc)).replace("/var/lib/mailappliance",
                                                                 str(data))
    text = text.replace("/run/mailappliance", str(root / "run"))
    cfg = etc / "mailappliance.toml"
    cfg.write_text(text)
    os.chmod(cfg, 0o640)
    cli(cfg, "domain", "add", "example.com")          # as root: acts as the data owner
    cli(cfg, "user", "add", "test@example.com", "--password-stdin", input="Passw0rd!\n")
    return cfg


def cli(cfg, *args, input=None, user=None, env=None, check=True):
    res = subprocess.run([env.get("_python", sys.executable) if env else sys.executable,
                          "-m", "mailappliance.cli", "--config", str(cfg), *args],
                         input=input, capture_output=True, text=True, timeout=60,
                         user=user, env={**os.environ, **(env or {})}, cwd="/")
    if check and res.returncode != 0:
        raise AssertionError(res.stderr)
    return res


def problems(res) -> list[str]:
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert all(line.startswith("mailappliance: ") for line in lines), lines
    return [line[len("mailappliance: "):] for line in lines]


def test_a_sound_configuration_passes_and_each_problem_is_one_line(nobody):  # noqa: F811
    user, python, env, root = nobody
    cfg = setup_instance(root, user)
    res = cli(cfg, "check", "--user", "nobody")
    assert res.returncode == 0 and "no problems found" in res.stdout, res.stderr
    res = cli(cfg, "check")                           # the data directory's owner: nobody
    assert res.returncode == 0 and "server user nobody (uid 65534)" in res.stdout

    etc, data = root / "etc", root / "data"
    os.chmod(etc / "key.pem", 0o600)                  # root only: a reload as nobody fails
    other = root / "other"
    other.mkdir()
    self_signed(other)
    shutil.copy(other / "cert.pem", etc / "cert.pem")  # a certificate of another key
    with open(etc / "tcp.smtp", "a") as f:
        f.write("10.0.0.0/99:allow\n")
    os.chmod(data, 0o755)
    text = cfg.read_text().replace('submission = ["tcp:587"]',
                                   'submission = ["tcp:25:interface=127.0.0.1"]')
    cfg.write_text(text)
    db = sqlite3.connect(data / "users.sqlite")
    with db:
        db.execute("INSERT INTO aliases(domain, local, targets) VALUES "
                   "('example.com', 'test', '[\"x@example.org\"]')")
    db.close()
    got = problems(cli(cfg, "check", check=False))
    expected_starts = [
        f"tls.key: {etc / 'key.pem'} is not readable by nobody (uid 65534) (mode 0600",
        f"tls.key: {etc / 'key.pem'} does not match the certificate {etc / 'cert.pem'}",
        f"data: {data} is mode 0755: other users can look into",
        "listen.smtp 'tcp:25' and listen.submission 'tcp:25:interface=127.0.0.1': both want "
        "port 25",
        "users: alias test@example.com is also a user and is never used",
    ]
    for start in expected_starts:
        assert sum(line.startswith(start) for line in got) == 1, (start, got)
    rules = [line for line in got if "tcp.smtp" in line and "99" in line]
    assert len(rules) == 1, got
    assert len(got) == len(expected_starts) + 1, got

    # A directory above the data directory that the server's user may not enter.
    os.chmod(root, 0o700)
    got = problems(cli(cfg, "check", check=False))
    assert any(line.startswith(f"data: nobody (uid 65534) may not enter {root} (mode 0700")
               for line in got), got
    os.chmod(root, 0o755)

    # What `mailappliance domain add` run as root before the first start makes: a data
    # directory root owns, for a server that runs as nobody. Named, with the fix.
    os.chown(data, 0, 0)
    got = problems(cli(cfg, "check", "--user", "nobody", check=False))
    assert any(line.startswith(f"data: {data} belongs to root (uid 0), not to nobody (uid "
                               f"65534) that the server runs as; chown -R nobody: {data}")
               for line in got), got


def test_a_key_the_running_user_cannot_read_says_permission_denied(nobody):  # noqa: F811
    user, python, env, root = nobody
    cfg = setup_instance(root, user)
    os.chmod(cfg, 0o644)
    os.chmod(root / "etc" / "key.pem", 0o600)
    full = {**os.environ, **env}
    # What twistd prints when it loads this configuration (config.py), run as nobody:
    res = subprocess.run([python, "-c", "import sys; from mailappliance.config import "
                          "load_settings, ConfigError\ntry: load_settings(sys.argv[1])\n"
                          "except ConfigError as e: print(e)", str(cfg)],
                         capture_output=True, text=True, timeout=60, env=full,
                         user=user.pw_uid, cwd="/")
    assert res.stdout.strip() == (f"{cfg}: tls.key: cannot read {root / 'etc' / 'key.pem'}: "
                                  "Permission denied"), res
    # and `mailappliance check` run as nobody
    res = subprocess.run([python, "-m", "mailappliance.cli", "--config", str(cfg), "check"],
                         capture_output=True, text=True, timeout=60, env=full,
                         user=user.pw_uid, cwd="/")
    got = problems(res)
    assert f"tls.key: cannot read {root / 'etc' / 'key.pem'}: Permission denied" in got
    assert not any("not a" in line and "PEM" in line for line in got), got


def test_a_toml_mistake_is_one_line(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'data = "{tmp_path}"\nbogus = 1\n')
    res = subprocess.run([sys.executable, "-m", "mailappliance.cli", "--config", str(cfg),
                          "check"], capture_output=True, text=True, timeout=60)
    assert problems(res) == [f"{cfg}: bogus: unknown key"]
