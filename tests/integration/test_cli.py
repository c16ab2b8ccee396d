"""The `mailappliance` command end to end, as a subprocess against a temporary data directory."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

PW = "Passw0rd!\n"


def cli(data, *args, input=None):
    return subprocess.run([sys.executable, "-m", "mailappliance.cli", "--data", str(data), *args],
                          input=input, capture_output=True, text=True, timeout=60)


def test_domain_user_alias_commands(tmp_path):
    d = tmp_path / "var"
    r = cli(d, "domain", "add", "Test.com")
    assert (r.returncode, r.stdout, r.stderr) == (0, "domain test.com added\n", "")
    r = cli(d, "user", "add", "joe@test.com", "--password-stdin", "--quota", "1000000", input=PW)
    assert r.returncode == 0, r.stderr
    assert (d / "domains/test.com/joe/Maildir/new").is_dir()
    assert cli(d, "user", "list").stdout == "joe@test.com quota=1000000\n"
    assert cli(d, "user", "list", "test.com").stdout == "joe@test.com quota=1000000\n"
    r = cli(d, "alias", "add", "info@test.com", "joe@test.com", "ext@example.org")
    assert r.returncode == 0
    assert "info@test.com -> joe@test.com ext@example.org\n" in cli(d, "alias", "list").stdout
    assert "postmaster@test.com -> joe@test.com\n" in cli(d, "alias", "list").stdout
    assert cli(d, "domain", "list").stdout == "test.com\n"
    assert cli(d, "user", "passwd", "joe@test.com", "--password-stdin",
               input="An0ther-one\n").returncode == 0
    assert cli(d, "alias", "del", "info@test.com").returncode == 0
    assert cli(d, "user", "del", "joe@test.com").returncode == 0
    assert cli(d, "domain", "del", "test.com").returncode == 0
    assert cli(d, "domain", "list").stdout == ""


def test_refusals_exit_1_with_one_line(tmp_path):
    d = tmp_path / "var"
    cli(d, "domain", "add", "test.com")
    for args, inp, text in [
        (("domain", "add", "test.com"), None, "mailappliance: domain test.com already exists\n"),
        (("user", "add", "x@nowhere.example", "--password-stdin"), PW,
         "mailappliance: no such domain: nowhere.example\n"),
        (("user", "add", "x@test.com", "--password-stdin"), "short\n",
         "mailappliance: password too short: at least 8 characters\n"),
        (("user", "add", "../x@test.com", "--password-stdin"), PW, None),
        (("user", "del", "ghost@test.com"), None, "mailappliance: no such user: ghost@test.com\n"),
        (("user", "add", "x@test.com"), "", None),  # no terminal and no --password-stdin
    ]:
        r = cli(d, *args, input=inp)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("mailappliance: ")
        if text:
            assert r.stderr == text


def test_usage_errors_exit_2(tmp_path):
    d = tmp_path / "var"
    for args in (("domain",), ("frobnicate",), ("user", "add"), ("user", "add", "a@b.c", "--quota", "x")):
        r = cli(d, *args)
        assert r.returncode == 2, (args, r.stderr)
    r = subprocess.run([sys.executable, "-m", "mailappliance.cli", "--data", "a", "--config", "b",
                        "domain", "list"], capture_output=True, text=True)
    assert r.returncode == 2


def test_bad_config_file_is_a_refusal_with_one_line(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text("bogus = 1\n")
    r = subprocess.run([sys.executable, "-m", "mailappliance.cli", "--config", str(cfg),
                        "domain", "list"], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (1, f"mailappliance: {cfg}: bogus: unknown key\n")


def test_password_prompt_without_echo_on_a_terminal(tmp_path):
    """Without --password-stdin the password is prompted (twice) on the tty, never echoed."""
    d = tmp_path / "var"
    cli(d, "domain", "add", "test.com")
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "mailappliance.cli", "--data", str(d),
                                  "user", "add", "tty@test.com"])
    out = b""
    import select
    import time
    deadline = time.monotonic() + 30
    sent = 0
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if out.count(b"password:") > sent:
                os.write(fd, b"S3cret-pass\n")
                sent += 1
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert b"S3cret-pass" not in out, "the password is never echoed"
    assert b"user tty@test.com added" in out
