"""POP3 wire details real clients found (issue 17), against the real server with TLS: the
greeting carries no APOP timestamp while APOP is not offered (mpop's default `auth on` would
try APOP; tested with mpop in test_pop3_clients.py), and STLS after login says it is only
allowed before login instead of "-ERR unimplemented"."""

from __future__ import annotations

import poplib
import re

from tests.integration.test_pop3_server import PASSWORD, start_with_user, tls_config
from tests.pop3_support import make_cert

IO_TIMEOUT = 30


def test_greeting_without_apop_timestamp_and_stls_after_login(make_server, tmp_path):
    srv = start_with_user(make_server(tls_config(*make_cert(tmp_path / "tls"))))
    p = poplib.POP3("127.0.0.1", srv.port("pop3"), timeout=IO_TIMEOUT)
    try:
        greeting = p.getwelcome()
        assert greeting.startswith(b"+OK ")
        assert not re.search(rb"<[^>]*@[^>]*>", greeting), greeting     # no RFC 1939 timestamp
        assert "STLS" in p.capa()                                        # offered before login
        p.user("test")
        p.pass_(PASSWORD)
        try:
            p._shortcmd("STLS")
            raise AssertionError("STLS accepted after login")
        except poplib.error_proto as e:
            assert e.args[0] == b"-ERR STLS is only allowed before login (RFC 2595 4)"
        assert p.stat()[0] == 0                                          # the session goes on
    finally:
        p.quit()
