"""mailappliance-sendmail: option parsing, -t/Bcc, -i, added headers, exit codes, and the
message landing in the real queue directory through QueueStore.inject."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from mailappliance import sendmail
from mailappliance.queue.store import QueueStore
from mailappliance.sendmail import Options, UsageError, build_message, parse_args


@pytest.mark.parametrize("argv, extract, dots, sender, name, rcpts", [
    (["a@b.example"], False, False, None, None, ["a@b.example"]),
    (["-t"], True, False, None, None, []),
    (["-t", "-i", "x@y.example"], True, True, None, None, ["x@y.example"]),
    (["-oi", "-f", "me@here.example", "r"], False, True, "me@here.example", None, ["r"]),
    (["-fme@here.example", "-FMy Name", "r"], False, False, "me@here.example", "My Name", ["r"]),
    (["-r", "<>", "-F", "N", "--", "-odd@x.example"], False, False, "<>", "N", ["-odd@x.example"]),
    (["-oem", "-odb", "-bm", "-v", "-N", "never", "r"], False, False, None, None, ["r"]),
])
def test_parse_args(argv, extract, dots, sender, name, rcpts):
    o = parse_args(argv)
    assert (o.extract, o.ignore_dots, o.sender, o.fullname, o.recipients) == \
        (extract, dots, sender, name, rcpts)


@pytest.mark.parametrize("argv", [["-x"], ["-f"], ["-bs"], ["-bp"], ["--bogus"], ["--data"]])
def test_usage_errors(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


def build(argv, raw, **kw):
    kw.setdefault("sender", "root@test.com")
    return build_message(parse_args(argv), raw, hostname="mx.test.com",
                         default_domain="test.com", uid=0, now=0, unique="u1", **kw)


def test_t_takes_to_cc_bcc_and_removes_bcc():
    raw = (b"From: me@test.com\nTo: A <a@x.example>, b@y.example\nCc: c@z.example\n"
           b"Bcc: hidden@secret.example,\n  other@secret.example\nSubject: s\n\nbody\nBcc: no\n")
    msg, rcpts = build(["-t", "extra@w.example"], raw)
    assert rcpts == ["extra@w.example", "a@x.example", "b@y.example", "c@z.example",
                     "hidden@secret.example", "other@secret.example"]
    assert b"secret.example" not in msg.split(b"\n\n", 1)[0]
    assert msg.endswith(b"\n\nbody\nBcc: no\n")           # body untouched


def test_missing_headers_are_added_and_bare_names_get_the_default_domain():
    msg, rcpts = build(["-F", "Cron Daemon", "root", "Admin <admin>"], b"Subject: s\n\nhi\n")
    head = msg.split(b"\n\n", 1)[0].decode()
    assert rcpts == ["root@test.com", "admin@test.com"]
    assert head.startswith("Received: (mailappliance-sendmail invoked by uid 0); ")
    assert "From: Cron Daemon <root@test.com>" in head
    assert "Date: Thu, 01 Jan 1970 00:00:00 -0000" in head
    assert "Message-ID: <u1@mx.test.com>" in head


def test_existing_headers_are_kept():
    msg, _ = build(["r"], b"From: x@y.example\nDate: today\nMessage-ID: <m@x>\n\nb\n")
    assert msg.count(b"From:") == 1 and msg.count(b"Date:") == 1 and msg.count(b"Message-ID") == 1


def test_duplicate_recipients_once():
    _, rcpts = build(["-t", "a@x.example"], b"To: A@x.example\n\nb\n")
    assert rcpts == ["a@x.example"]


def test_bad_address_is_a_usage_error():
    with pytest.raises(UsageError):
        build(["a b@@x"], b"\n")


@pytest.mark.parametrize("stdin, dots, stored", [
    (b"a\n.\nb\n", False, b"a\n"),
    (b"a\n.\nb\n", True, b"a\n.\nb\n"),
    (b"a\r\nb\r\n", False, b"a\nb\n"),
    (b"a\rb", True, b"a\nb\n"),                            # no bare CR reaches the queue
    (b".\n", False, b""),
    (b"no newline", True, b"no newline\n"),
])
def test_read_message(stdin, dots, stored):
    assert sendmail._read_message(io.BytesIO(stdin), dots, 10_000) == stored


def instance(tmp_path):
    """A data directory that holds an instance (the store commands' first step)."""
    (tmp_path / "var").mkdir(exist_ok=True)
    (tmp_path / "var" / "users.sqlite").touch()
    return tmp_path / "var"


def run(tmp_path, argv, stdin=b"Subject: t\n\nhello\n", make=True, **env):
    if make:
        instance(tmp_path)
    err = io.StringIO()
    code = sendmail.main(["--data", str(tmp_path / "var"), *argv], stdin=io.BytesIO(stdin),
                         stderr=err)
    return code, err.getvalue()


def test_main_queues_durably_and_exits_0(tmp_path):
    code, err = run(tmp_path, ["-f", "sender@test.com", "-t"],
                    b"To: rcpt@test.com\nBcc: secret@test.com\nSubject: t\n\nhello\n.\nafter\n")
    assert (code, err) == (0, "")
    q = QueueStore(tmp_path / "var" / "queue")
    (qid,) = q.list_ids()
    env = q.read_envelope(qid)
    assert env.sender == "sender@test.com"
    assert [r.address for r in env.recipients] == ["rcpt@test.com", "secret@test.com"]
    msg = q.read_message(env)
    assert msg.endswith(b"\n\nhello\n") and b"Bcc" not in msg and b"after" not in msg


def test_main_null_sender(tmp_path):
    assert run(tmp_path, ["-f", "<>", "r@test.com"])[0] == 0
    q = QueueStore(tmp_path / "var" / "queue")
    assert q.read_envelope(q.list_ids()[0]).sender == ""


def test_main_exit_codes(tmp_path):
    assert run(tmp_path, [])[0] == 64                      # no recipients
    assert run(tmp_path, ["-Z"])[0] == 64
    (tmp_path / "var" / "queue").write_text("not a directory")
    code, err = run(tmp_path, ["r@test.com"])
    assert code == 75 and "qq write error" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = 1\n")
    assert sendmail.main(["--config", str(bad), "r@test.com"], stdin=io.BytesIO(b""),
                         stderr=io.StringIO()) == 78


def test_main_refuses_message_over_databytes(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{instance(tmp_path)}"\n[smtp]\ndatabytes = 100\n')
    err = io.StringIO()
    code = sendmail.main(["--config", str(cfg), "r@test.com"],
                         stdin=io.BytesIO(b"x" * 500 + b"\n"), stderr=err)
    assert code == 65


def test_default_sender_is_the_login_name_at_the_default_domain(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGNAME", "cronjob")
    assert run(tmp_path, ["r@test.com"])[0] == 0
    q = QueueStore(tmp_path / "var" / "queue")
    assert q.read_envelope(q.list_ids()[0]).sender.startswith("cronjob@")
    monkeypatch.setenv("LOGNAME", "bad name")
    assert sendmail._login_name() == f"uid-{__import__('os').getuid()}"


def test_the_command_and_the_store_commands_load_no_twisted(tmp_path):
    """mailappliance-sendmail and `mailappliance user ...` work on the stores without the
    server's code: nothing of Twisted is imported on their way (fresh interpreter)."""
    data = tmp_path / "var"
    script = (
        "import io, sys\n"
        "from mailappliance import cli, sendmail\n"
        f"a = cli.main(['--data', {str(data)!r}, 'domain', 'add', 'test.com'])\n"
        f"b = sendmail.main(['--data', {str(data)!r}, 'r@test.com'],"
        " stdin=io.BytesIO(b'Subject: x\\n\\nhi\\n'))\n"
        "print(a, b, sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.split("\n")[-2] == "0 0 []", out
    assert len(QueueStore(data / "queue").list_ids()) == 1


def test_written_directly_a_long_line_is_re_encoded_before_it_is_signed(tmp_path):
    """With the server down the command signs itself (sendmail._signed): a line over RFC
    5321's limit is re-encoded first, so the signature covers the bytes that are sent."""
    import dkim

    from mailappliance.mailauth import keys
    key = keys.generate(tmp_path, "test.com", "mail", "rsa")
    message = b"From: a@test.com\nSubject: long\n\n" + b"u" * 3000 + b"\n"
    out = sendmail._signed(str(tmp_path), message, "a@test.com", warn=print)
    assert out.startswith(b"DKIM-Signature:") and max(map(len, out.splitlines())) <= 998
    assert dkim.verify(out.replace(b"\n", b"\r\n"),
                       dnsfunc=lambda name, timeout=5: key.txt_record().encode())
