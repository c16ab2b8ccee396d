"""The pure parts of SMTP AUTH and sender binding: the SASL PLAIN/LOGIN exchange (sasl.py), the
streaming From: header scanner and the may-send-as rule (binding.py), and the core's 538 for
AUTH before TLS."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailappliance.smtp import binding, replies, sasl
from mailappliance.smtp.binding import FromHeader, FromScanner, may_send_as
from mailappliance.smtp.core import NEED_DATA, Handled, ServerConnection
from mailappliance.smtp.sasl import Challenge, Credentials, Exchange, Malformed


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- SASL ---------------------------------------------------------------------------------------

def test_plain_with_initial_response():
    step = Exchange("PLAIN").start(b64("\0alice@test.com\0s3cret"))
    assert step == Credentials("alice@test.com", "s3cret", "")


def test_plain_without_initial_response_gets_an_empty_challenge():
    ex = Exchange("PLAIN")
    assert ex.start(None) == Challenge("")
    assert ex.respond(b64("alice\0alice\0pw")) == Credentials("alice", "pw", "alice")


def test_login_asks_for_user_name_then_password():
    ex = Exchange("LOGIN")
    assert ex.start(None) == Challenge(sasl.USERNAME_CHALLENGE)
    assert base64.b64decode(sasl.USERNAME_CHALLENGE) == b"Username:"
    assert ex.respond(b64("alice@test.com")) == Challenge(sasl.PASSWORD_CHALLENGE)
    assert base64.b64decode(sasl.PASSWORD_CHALLENGE) == b"Password:"
    assert ex.respond(b64("pässword")) == Credentials("alice@test.com", "pässword")
    assert isinstance(ex.respond(b64("again")), Malformed)     # the exchange is over


def test_login_with_initial_user_name():
    ex = Exchange("LOGIN")
    assert ex.start(b64("alice")) == Challenge(sasl.PASSWORD_CHALLENGE)
    assert ex.respond(b64("pw")) == Credentials("alice", "pw")


@pytest.mark.parametrize("mechanism, initial, responses", [
    ("PLAIN", "not base64!", []),
    ("PLAIN", b64("only-one-part"), []),
    ("PLAIN", b64("a\0b\0c\0d"), []),
    ("PLAIN", b64("\0\0pw"), []),                 # empty user name
    ("PLAIN", b64("\0alice\0"), []),              # empty password
    ("PLAIN", "=", []),                           # empty initial response
    ("PLAIN", base64.b64encode(b"\0a\0\xff\xfe").decode(), []),   # not UTF-8
    ("PLAIN", "YWJj", []),                        # valid base64, no NULs
    ("PLAIN", "YWJ", []),                         # bad padding
    ("LOGIN", None, ["%%%"]),
    ("LOGIN", None, ["="]),                       # empty user name
    ("LOGIN", None, [b64("alice"), "="]),         # empty password
    ("LOGIN", None, [b64("alice"), "***"]),
])
def test_malformed_input_ends_the_exchange(mechanism, initial, responses):
    ex = Exchange(mechanism)
    step = ex.start(initial)
    for line in responses:
        assert isinstance(step, Challenge)
        step = ex.respond(line)
    assert isinstance(step, Malformed)


def test_password_is_not_in_the_repr():
    assert "s3cret" not in repr(Credentials("alice", "s3cret"))


def test_unknown_mechanism_is_a_programming_error():
    with pytest.raises(ValueError):
        Exchange("CRAM-MD5")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s),
       st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s))
def test_plain_round_trips_any_utf8(authzid, login, password):
    authzid = authzid.replace("\0", "")
    step = Exchange("PLAIN").start(b64(f"{authzid}\0{login}\0{password}"))
    assert step == Credentials(login, password, authzid)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_arbitrary_lines_never_raise(line):
    for mech in sasl.MECHANISMS:
        ex = Exchange(mech)
        step = ex.start(line)
        if isinstance(step, Challenge):
            step = ex.respond(line)
        assert isinstance(step, (Challenge, Credentials, Malformed))


# --- the core's AUTH before TLS -------------------------------------------------------------------

def _core(**kw) -> ServerConnection:
    conn = ServerConnection("mx.test.com", databytes=1000, max_recipients=5, **kw)
    conn.send(replies.greeting("mx.test.com"))
    return conn


def test_auth_before_tls_gets_538_and_is_not_listed():
    conn = _core(starttls_offered=True)
    conn.auth_after_tls = True
    conn.receive_data(b"EHLO c\r\n")
    ev = conn.next_event()
    assert "AUTH" not in conn.send(ev.reply).decode()
    conn.receive_data(b"AUTH PLAIN AGEAYg==\r\n")
    ev = conn.next_event()
    assert isinstance(ev, Handled) and ev.reply is replies.AUTH_NEEDS_TLS
    assert conn.send(ev.reply) == (b"538 5.7.11 sorry, encryption required for authentication;"
                                   b" say STARTTLS first (#5.7.11)\r\n")
    assert conn.next_event() is NEED_DATA


def test_auth_not_offered_at_all_stays_502():
    conn = _core()
    conn.receive_data(b"AUTH PLAIN AGEAYg==\r\n")
    assert conn.next_event().reply is replies.UNIMPLEMENTED


# --- From: scanner --------------------------------------------------------------------------------

HEADER = (b"Received: from somewhere\n"
          b"Subject: hello\n"
          b"From: Alice Example <alice@test.com>,\n"
          b"\t\"Sales, Inc.\" <sales@test.com>\n"
          b"To: bob@example.org\n"
          b"\n"
          b"From: not-a-header@evil.example\n"
          b"body\n")


def scan(*pieces: bytes) -> FromHeader:
    s = FromScanner()
    for p in pieces:
        s.feed(p)
    return s.finish()


def test_from_with_folded_second_address():
    assert scan(HEADER) == FromHeader(("alice@test.com", "sales@test.com"), False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(HEADER)), max_size=8))
def test_scanner_result_does_not_depend_on_how_the_message_is_split(cuts):
    points = sorted(set(cuts))
    pieces = [HEADER[a:b] for a, b in zip([0, *points], [*points, len(HEADER)])]
    assert scan(*pieces) == scan(HEADER)


@pytest.mark.parametrize("message, expected", [
    (b"Subject: x\n\nbody\n", FromHeader((), False)),                   # no From: at all
    (b"FROM: a@b.example\n\n", FromHeader(("a@b.example",), False)),
    (b"from  \t: a@b.example\n\n", FromHeader(("a@b.example",), False)),   # obsolete blanks
    (b"From: a@b.example\nFrom: c@d.example\n\n",
     FromHeader(("a@b.example", "c@d.example"), False)),
    (b"From: a@b.example", FromHeader(("a@b.example",), False)),      # ends in the header
    (b"From: (comment) a@b.example (x)\n\n", FromHeader(("a@b.example",), False)),
    (b"From: undisclosed-recipients:;\n\n", FromHeader((), True)),
    (b"From: no address here\n\n", FromHeader((), True)),
    (b"From:\n\n", FromHeader((), True)),
    (b"X-From: a@b.example\nFromage: c@d.example\n\n", FromHeader((), False)),
    (b"\n From: a@b.example\n", FromHeader((), False)),                 # body only
])
def test_from_forms(message, expected):
    assert scan(message) == expected


def test_long_lines_are_not_stored_and_an_oversized_from_is_unreadable():
    s = FromScanner()
    s.feed(b"X-Long: " + b"y" * 1_000_000)
    assert len(s._line) <= binding.MAX_LINE_PREFIX
    s.feed(b"\nFrom: a@b.example\n\n")
    assert s.finish() == FromHeader(("a@b.example",), False)
    big = b"From: " + b", ".join(b"u%d@b.example" % i for i in range(3000)) + b"\n\n"
    assert len(big) > binding.MAX_FROM_BYTES
    assert scan(big) == FromHeader((), True)
    s = FromScanner()
    s.feed(b"From:")
    for _ in range(100):
        s.feed(b"\n a@b.example" + b" " * 500)
    assert len(s._field or b"") <= binding.MAX_FROM_BYTES
    assert s.finish().unreadable


def test_from_hidden_behind_many_blanks_before_the_colon_is_still_seen():
    found = scan(b"From" + b" " * 200 + b": ceo@bank.example\n\n")
    assert found == FromHeader(("ceo@bank.example",), False)


def test_body_is_not_scanned():
    s = FromScanner()
    s.feed(b"Subject: x\n\n")
    assert s.done
    s.feed(b"From: evil@x.example\n" * 10)
    assert s.finish() == FromHeader((), False)


# --- may_send_as ------------------------------------------------------------------------------------

ALIASES = {"sales@test.com": ["alice@test.com", "bob@test.com"],
           "other@test.com": ["bob@test.com"],
           "postmaster@test.com": ["Alice@test.com"]}


@pytest.mark.parametrize("address, allowed", [
    ("alice@test.com", True),
    ("ALICE@Test.COM", True),
    ("sales@test.com", True),
    ("Postmaster@test.com", True),
    ("other@test.com", False),
    ("bob@test.com", False),
    ("alice@test.com.evil.example", False),
    ("alice", False),
    ("a@b@test.com", False),
])
def test_may_send_as_own_address_and_aliases(address, allowed):
    assert may_send_as(address, "alice@test.com", ALIASES.get) is allowed
