"""SMTP AUTH on the real server: swaks (--tls --auth PLAIN / LOGIN, and on the implicit-TLS
port), smtplib starttls() + login(), AUTH refused before STARTTLS, a wrong password (535 after
the per-IP delay, the fail2ban line; the growing delays and the 421 after three are timed with a
clock in tests/adapters/test_smtp_auth.py), sender binding on MAIL FROM and From:, and a
certificate replaced on disk being served after `mailappliance reload` and after SIGHUP.

Each test talks from its own 127.0.0.N, so the per-address login penalty of one test never
slows another. Remote recipients route to a closed local port: relayed mail stays queued."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import base64

import pytest

from tests.conftest import require_tool
from tests.integration.opstools import wait_for
from tests.integration.server import tls_submission_server
from tests.integration.test_smtp_server import IO_TIMEOUT, message_bytes
from tests.pop3_support import make_cert

PASSWORD = "Passw0rd!"
USER = "test@test.com"
# Upper bound on waiting for the server to pick up a reload (it parses and loads at once).
RELOAD_TIMEOUT = 15.0


def _server(root, *, extra=""):
    s = tls_submission_server(root, extra)
    s.cli("user", "add", USER, "--password-stdin", input=PASSWORD + "\n")
    s.cli("user", "add", "other@test.com", "--password-stdin", input=PASSWORD + "\n")
    s.cli("alias", "add", "info@test.com", USER)
    return s


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = _server(tmp_path_factory.mktemp("smtp-auth"))
    s.start()
    yield s
    s.stop()


def insecure_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE           # the tests compare the served certificate
    return ctx


def submission(srv, ip) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", srv.port("submission"), timeout=IO_TIMEOUT,
                        source_address=(ip, 0))


def swaks(srv, *args, port_kind="submission"):
    tool = require_tool("swaks")
    return subprocess.run(
        [tool, "--server", f"127.0.0.1:{srv.port(port_kind)}", "--timeout", "20", *args],
        capture_output=True, text=True, timeout=90)


# --- swaks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mech, login, ip", [
    ("PLAIN", USER, "127.0.0.31"),
    ("LOGIN", "test", "127.0.0.32"),          # "test" alone: default_domain
])
def test_swaks_starttls_auth_and_relay(srv, mech, login, ip):
    marker = f"swaks-{mech}-{time.monotonic_ns()}"
    res = swaks(srv, "--tls", "--auth", mech, "--auth-user", login, "--auth-password", PASSWORD,
                "--local-interface", ip, "--from", USER, "--to", "someone@remote.example",
                "--header", f"From: Test <{USER}>", "--body", marker)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "<~  235 2.7.0 ok, go ahead (#2.0.0)" in res.stdout
    assert re.search(r"<~  250 2\.0\.0 ok \d+ qp \d+", res.stdout)
    data = wait_for(lambda: message_bytes(srv, marker), RELOAD_TIMEOUT, "the queued message")
    assert b"with ESMTPSA;" in data
    assert PASSWORD not in srv.output()


def test_swaks_implicit_tls_port(srv):
    marker = f"swaks-465-{time.monotonic_ns()}"
    res = swaks(srv, "--tls-on-connect", "--auth", "PLAIN", "--auth-user", USER,
                "--auth-password", PASSWORD, "--local-interface", "127.0.0.33",
                "--from", "info@test.com", "--to", USER, "--body", marker,
                port_kind="submissions")
    assert res.returncode == 0, res.stdout + res.stderr
    assert wait_for(lambda: message_bytes(srv, marker), RELOAD_TIMEOUT, "the message")


def test_swaks_wrong_password_is_refused(srv):
    res = swaks(srv, "--tls", "--auth", "PLAIN", "--auth-user", USER, "--auth-password",
                "Wrong-pass-1", "--local-interface", "127.0.0.34", "--from", USER,
                "--to", USER)
    assert res.returncode != 0
    assert "<~* 535 5.7.8 authorization failed (#5.7.0)" in res.stdout


# --- smtplib ---------------------------------------------------------------------------------------

def test_smtplib_starttls_login_and_send(srv):
    marker = f"smtplib-auth-{time.monotonic_ns()}"
    with submission(srv, "127.0.0.35") as s:
        s.ehlo("c")
        assert not s.has_extn("auth")
        s.starttls(context=insecure_context())
        s.ehlo("c")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        code, _ = s.login(USER, PASSWORD)
        assert code == 235
        refused = s.sendmail(USER, ["far@remote.example", USER],
                             f"From: {USER}\r\nSubject: auth\r\n\r\n{marker}\r\n")
        assert refused == {}
    assert b"with ESMTPSA;" in wait_for(lambda: message_bytes(srv, marker), RELOAD_TIMEOUT,
                                        "the message")


def test_auth_before_starttls_is_refused(srv):
    creds = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    with submission(srv, "127.0.0.36") as s:
        s.ehlo("c")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        code, text = s.docmd("AUTH", f"PLAIN {creds}")
        assert (code, text) == (538, b"5.7.11 sorry, encryption required for authentication;"
                                     b" say STARTTLS first (#5.7.11)")
        code, text = s.docmd("MAIL", f"FROM:<{USER}>")
        assert code == 530
    # Port 25 does not offer AUTH, even inside TLS.
    with smtplib.SMTP("127.0.0.1", srv.port("smtp"), timeout=IO_TIMEOUT,
                      source_address=("127.0.0.36", 0)) as s:
        s.starttls(context=insecure_context())
        s.ehlo("c")
        assert not s.has_extn("auth")
        assert s.docmd("AUTH", f"PLAIN {creds}")[0] == 502


def test_a_wrong_password_is_delayed_and_logged_for_fail2ban(srv):
    """One failure on the real server: 535 after the first penalty step, the session still
    open, the line fail2ban reads. The later steps (4 s, 8 s) and the 421 and close after the
    third failure are the same code timed with a clock in tests/adapters/test_smtp_auth.py
    (test_failed_logins_are_delayed_logged_and_the_third_closes), not 14 s of waiting here."""
    ip = "127.0.0.37"
    login = "test@test.com"
    with submission(srv, ip) as s:
        s.starttls(context=insecure_context())
        s.ehlo("c")
        creds = base64.b64encode(f"\0{login}\0Wrong-pass-0".encode()).decode()
        t0 = time.monotonic()
        code, text = s.docmd("AUTH", f"PLAIN {creds}")
        assert code == 535, text
        assert time.monotonic() - t0 >= 1.9               # Dovecot's first step: 2 s
        assert s.noop()[0] == 250
    current = srv.data / "log" / "current"          # the mail log fail2ban would read
    log = wait_for(lambda: (text := current.read_text()).count(f"auth failed: rip={ip} ") == 1
                   and text, RELOAD_TIMEOUT, "the failure line")
    failregex = re.compile(r"^\S+ smtp: auth failed: rip=(?P<host>\S+) user=<(?P<user>[^>]*)>",
                           re.M)
    hits = [m.groups() for m in failregex.finditer(log) if m.group("host") == ip]
    assert hits == [(ip, login)]
    assert "Wrong-pass" not in log


# --- sender binding --------------------------------------------------------------------------------

def test_sender_binding_on_mail_from_and_from_header(srv):
    marker = f"binding-{time.monotonic_ns()}"
    with submission(srv, "127.0.0.38") as s:
        s.starttls(context=insecure_context())
        s.ehlo("c")
        s.login("test", PASSWORD)
        code, text = s.docmd("MAIL", "FROM:<other@test.com>")
        assert code == 553 and b"not yours; you are logged in as test@test.com" in text
        with pytest.raises(smtplib.SMTPDataError) as err:
            s.sendmail(USER, ["far@remote.example"],
                       f"From: Other <other@test.com>\r\nSubject: x\r\n\r\n{marker}-no\r\n")
        assert err.value.smtp_code == 553 and b"From: header" in err.value.smtp_error
        s.sendmail("info@test.com", ["far@remote.example"],
                   f"From: Info <info@test.com>\r\nSubject: x\r\n\r\n{marker}-yes\r\n")
    assert wait_for(lambda: message_bytes(srv, f"{marker}-yes"), RELOAD_TIMEOUT,
                    "the alias's message")
    assert message_bytes(srv, f"{marker}-no") == b""


def test_submission_without_auth_gets_530_even_inside_tls(srv):
    with submission(srv, "127.0.0.39") as s:
        s.starttls(context=insecure_context())
        s.ehlo("c")
        code, text = s.docmd("MAIL", f"FROM:<{USER}>")
        assert (code, text) == (530, b"5.7.0 sorry, authentication required (#5.7.0)")


# --- certificate reload ---------------------------------------------------------------------------

def served_certificate(srv, kind: str, ip: str) -> bytes:
    if kind == "submissions":
        raw = socket.create_connection(("127.0.0.1", srv.port(kind)), timeout=IO_TIMEOUT,
                                       source_address=(ip, 0))
        with insecure_context().wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)
    with smtplib.SMTP("127.0.0.1", srv.port(kind), timeout=IO_TIMEOUT,
                      source_address=(ip, 0)) as s:
        s.starttls(context=insecure_context())
        return s.sock.getpeercert(binary_form=True)


def der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_new_certificate_is_served_after_reload_and_sighup(tmp_path):
    s = _server(tmp_path)
    s.start()
    try:
        first = der(s.cert)
        assert served_certificate(s, "submission", "127.0.0.41") == first
        # Renewal: the new pair replaces the files in place (what certbot's deploy hook does).
        make_cert(tmp_path / "tls", name="renewed.test.example")
        second = der(s.cert)
        assert second != first
        assert served_certificate(s, "submission", "127.0.0.41") == first   # not before reload
        assert s.cli("reload").returncode == 0
        for kind in ("smtp", "submission", "submissions"):
            assert served_certificate(s, kind, "127.0.0.42") == second, kind

        # A broken key is refused by the reload and the running certificate stays.
        key_text = s.key.read_text()
        s.key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        res = s.cli("reload", check=False)
        assert res.returncode == 1 and "tls.key" in res.stderr
        assert served_certificate(s, "submission", "127.0.0.43") == second
        s.key.write_text(key_text)

        # SIGHUP does the same as `reload`.
        make_cert(tmp_path / "tls", name="third.test.example")
        third = der(s.cert)
        os.kill(s.proc.pid, signal.SIGHUP)
        wait_for(lambda: served_certificate(s, "submissions", "127.0.0.44") == third,
                 RELOAD_TIMEOUT, "the certificate after SIGHUP")
        # Sessions still work with the new certificate.
        with submission(s, "127.0.0.45") as c:
            c.starttls(context=insecure_context())
            c.ehlo("c")
            assert c.login(USER, PASSWORD)[0] == 235
    finally:
        s.stop()
