"""The POP3 state machine without sockets: every command, every error, the encoder."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings, strategies as st

from mailappliance.pop3 import core
from mailappliance.pop3.core import (
    NEED_DATA, PAUSED, Authenticate, Close, MessageEncoder, POP3Session, Retrieve, Send,
    StartTLS, Update, encode_whole, escape_login, parse_number)


@dataclass(frozen=True)
class Msg:
    uid: str
    size: int


MESSAGES = [Msg("1700000000.M1P1.host", 100), Msg("1700000001.M2P1.host", 250),
            Msg("1700000002.M3P1.host", 7)]


def drain(s: POP3Session) -> list:
    out = []
    for _ in range(10_000):
        a = s.next_action()
        if a is NEED_DATA or a is PAUSED:
            out.append(a)
            return out
        out.append(a)
    raise AssertionError("session produced endless actions")


def sent(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def talk(s: POP3Session, data: bytes) -> bytes:
    s.receive_data(data)
    return sent(drain(s))


def new_session(**kw) -> POP3Session:
    s = POP3Session(hostname="mx.test.example", **kw)
    s.start()
    drain(s)
    return s


def logged_in(messages=MESSAGES, **kw) -> POP3Session:
    s = new_session(**kw)
    s.receive_data(b"USER test\r\nPASS Passw0rd!\r\n")
    acts = drain(s)
    assert isinstance(acts[-2], Authenticate) and acts[-1] is PAUSED
    s.login_succeeded(list(messages))
    assert sent(drain(s)).startswith(b"+OK maildrop has")
    return s


# --- AUTHORIZATION -------------------------------------------------------------------------

def test_greeting_names_the_host_and_carries_no_apop_timestamp():
    """APOP is not offered, so no RFC 1939 <timestamp>: mpop's `auth on` would pick APOP."""
    s = POP3Session(hostname="mx.test.example")
    s.start()
    [greeting, _] = drain(s)
    assert greeting == Send(b"+OK mx.test.example POP3 server ready\r\n")
    assert b"<" not in greeting.data and b">" not in greeting.data


def test_user_always_ok_and_pass_requests_check_with_raw_login_and_spaces_kept():
    s = new_session()
    assert talk(s, b"USER nobody-such@example.org\r\n") == b"+OK\r\n"
    s.receive_data(b"PASS  two words \r\n")
    acts = drain(s)
    assert acts == [Authenticate("nobody-such@example.org", " two words "), PAUSED]
    assert s.waiting == "auth"


def test_pass_without_user():
    s = new_session()
    assert talk(s, b"PASS secret\r\n") == b"-ERR USER first\r\n"


def test_failed_login_same_answer_and_user_must_be_repeated():
    s = new_session()
    s.receive_data(b"USER a\r\nPASS b\r\n")
    drain(s)
    s.login_failed()
    assert sent(drain(s)) == b"-ERR authorization failed\r\n"
    assert talk(s, b"PASS b\r\n") == b"-ERR USER first\r\n"


def test_too_many_failures_close_the_connection():
    s = new_session()
    for i in range(core.MAX_AUTH_FAILURES):
        s.receive_data(b"USER a\r\nPASS b\r\n")
        drain(s)
        s.login_failed()
        acts = drain(s)
    assert sent(acts).startswith(b"-ERR authorization failed")
    assert any(isinstance(a, Close) for a in acts)
    assert s.state == core.CLOSED


def test_commands_pipelined_behind_pass_wait_for_the_answer():
    s = new_session()
    s.receive_data(b"USER test\r\nPASS pw\r\nSTAT\r\nQUIT\r\n")
    acts = drain(s)
    assert acts[-1] is PAUSED and not any(b"+OK 3" in a.data for a in acts if isinstance(a, Send))
    s.login_succeeded(MESSAGES)
    acts = drain(s)
    assert sent(acts) == b"+OK maildrop has 3 messages (357 octets)\r\n+OK 3 357\r\n"
    assert isinstance(acts[-2], Update)


def test_mailbox_in_use_and_mailbox_error_replies():
    s = new_session()
    s.receive_data(b"USER a\r\nPASS b\r\n")
    drain(s)
    s.mailbox_unavailable(in_use=True)
    assert sent(drain(s)) == b"-ERR [IN-USE] mailbox in use by another POP3 session\r\n"
    assert s.state == core.AUTHORIZATION
    s.receive_data(b"USER a\r\nPASS b\r\n")
    drain(s)
    s.mailbox_unavailable(in_use=False)
    assert sent(drain(s)).startswith(b"-ERR [SYS/TEMP]")


@pytest.mark.parametrize("cmd", [b"STAT", b"LIST", b"LIST 1", b"RETR 1", b"DELE 1", b"RSET",
                                 b"TOP 1 1", b"UIDL", b"UIDL 1"])
def test_transaction_commands_need_login(cmd):
    s = new_session()
    assert talk(s, cmd + b"\r\n") == b"-ERR authorization first\r\n"


def test_apop_refused_with_reason():
    s = new_session()
    out = talk(s, b"APOP test 0123456789abcdef0123456789abcdef\r\n")
    assert out.startswith(b"-ERR APOP not supported") and b"bcrypt" in out


def test_quit_in_authorization():
    s = new_session()
    s.receive_data(b"QUIT\r\nSTAT\r\n")
    assert drain(s) == [Send(b"+OK signing off\r\n"), Close("quit"), PAUSED]
    s.receive_data(b"NOOP\r\n")
    assert drain(s) == [PAUSED]


def test_noop_in_both_states():
    assert talk(new_session(), b"NOOP\r\n") == b"+OK\r\n"
    assert talk(logged_in(), b"noop\r\n") == b"+OK\r\n"


def test_user_pass_after_login_refused():
    s = logged_in()
    assert talk(s, b"USER x\r\n") == b"-ERR already authenticated\r\n"
    assert talk(s, b"PASS x\r\n") == b"-ERR already authenticated\r\n"
    assert talk(s, b"STLS\r\n") == b"-ERR STLS is only allowed before login (RFC 2595 4)\r\n"


# --- CAPA and STLS -------------------------------------------------------------------------

def capa(s) -> list[bytes]:
    out = talk(s, b"CAPA\r\n")
    assert out.startswith(b"+OK") and out.endswith(b"\r\n.\r\n")
    return out.split(b"\r\n")[1:-2]


def test_capa_plain_without_tls():
    caps = capa(new_session())
    assert caps[:5] == [b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"EXPIRE NEVER"]
    assert b"USER" in caps and b"STLS" not in caps
    assert any(c.startswith(b"IMPLEMENTATION") and b"no APOP" in c for c in caps)


def test_capa_offers_stls_then_not_after_tls():
    s = new_session(tls_available=True)
    assert b"STLS" in capa(s)
    s.receive_data(b"STLS\r\n")
    assert drain(s) == [Send(b"+OK begin TLS negotiation\r\n"), StartTLS(), PAUSED]
    s.tls_started()
    caps = capa(s)
    assert b"STLS" not in caps and b"USER" in caps
    assert talk(s, b"STLS\r\n") == b"-ERR TLS already active\r\n"


def test_capa_after_login_has_no_user_or_stls():
    caps = capa(logged_in(tls_available=True))
    assert b"USER" not in caps and b"STLS" not in caps and b"UIDL" in caps


def test_stls_unavailable_without_certificate():
    assert talk(new_session(), b"STLS\r\n").startswith(b"-ERR STLS not available")


def test_stls_discards_cleartext_pipelined_after_it():
    """CVE-2011-0411: commands sent in cleartext behind STLS must not run inside TLS."""
    s = new_session(tls_available=True)
    s.receive_data(b"USER victim\r\nSTLS\r\nUSER attacker\r\nPASS injected\r\n")
    acts = drain(s)
    assert acts[-2:] == [StartTLS(), PAUSED]
    s.tls_started()
    assert drain(s) == [NEED_DATA]
    assert talk(s, b"PASS x\r\n") == b"-ERR USER first\r\n"   # the USER before STLS is gone too


def test_require_tls_refuses_user_pass_until_stls():
    s = new_session(tls_available=True, require_tls=True)
    caps = capa(s)
    assert b"USER" not in caps and b"STLS" in caps
    assert talk(s, b"USER test\r\n").startswith(b"-ERR [AUTH] plaintext login disallowed")
    assert talk(s, b"PASS x\r\n").startswith(b"-ERR [AUTH]")
    s.receive_data(b"STLS\r\n")
    drain(s)
    s.tls_started()
    assert talk(s, b"USER test\r\n") == b"+OK\r\n"


def test_implicit_tls_session_allows_login_when_tls_required():
    s = new_session(tls_active=True, require_tls=True)
    assert b"STLS" not in capa(s)
    assert talk(s, b"USER test\r\n") == b"+OK\r\n"


# --- TRANSACTION ---------------------------------------------------------------------------

def test_stat_list_uidl():
    s = logged_in()
    assert talk(s, b"STAT\r\n") == b"+OK 3 357\r\n"
    assert talk(s, b"LIST\r\n") == b"+OK 3 messages (357 octets)\r\n1 100\r\n2 250\r\n3 7\r\n.\r\n"
    assert talk(s, b"LIST 2\r\n") == b"+OK 2 250\r\n"
    assert talk(s, b"UIDL\r\n") == (b"+OK unique-id listing follows\r\n1 1700000000.M1P1.host\r\n"
                                    b"2 1700000001.M2P1.host\r\n3 1700000002.M3P1.host\r\n.\r\n")
    assert talk(s, b"UIDL 3\r\n") == b"+OK 3 1700000002.M3P1.host\r\n"


def test_dele_marks_hides_and_rset_restores():
    s = logged_in()
    assert talk(s, b"DELE 2\r\n") == b"+OK message 2 deleted\r\n"
    assert talk(s, b"STAT\r\n") == b"+OK 2 107\r\n"
    assert talk(s, b"LIST\r\n") == b"+OK 2 messages (107 octets)\r\n1 100\r\n3 7\r\n.\r\n"
    assert talk(s, b"UIDL\r\n").count(b"\r\n") == 4
    for cmd in (b"DELE 2", b"RETR 2", b"LIST 2", b"UIDL 2", b"TOP 2 0"):
        assert talk(s, cmd + b"\r\n") == b"-ERR message 2 already deleted\r\n"
    assert talk(s, b"RSET\r\n") == b"+OK maildrop has 3 messages (357 octets)\r\n"
    assert talk(s, b"STAT\r\n") == b"+OK 3 357\r\n"


@pytest.mark.parametrize("arg, reply", [
    (b"0", b"-ERR no such message\r\n"),
    (b"4", b"-ERR no such message\r\n"),
    (b"999999999", b"-ERR no such message\r\n"),
    (b"-1", b"-ERR invalid message number: -1\r\n"),
    (b"+1", b"-ERR invalid message number: +1\r\n"),
    (b"1.0", b"-ERR invalid message number: 1.0\r\n"),
    (b"abc", b"-ERR invalid message number: abc\r\n"),
    (b"0x1", b"-ERR invalid message number: 0x1\r\n"),
    (b"1234567890", b"-ERR invalid message number: 1234567890\r\n"),
    ("\u0661".encode(), b"-ERR invalid message number: \xef\xbf\xbd\xef\xbf\xbd\r\n"),
])
@pytest.mark.parametrize("cmd", [b"RETR", b"DELE", b"LIST", b"UIDL"])
def test_message_number_checking(cmd, arg, reply):
    """qmail-pop3d's strictness: never Python's negative or out-of-range indexing."""
    s = logged_in()
    assert talk(s, cmd + b" " + arg + b"\r\n") == reply
    assert talk(s, b"STAT\r\n") == b"+OK 3 357\r\n"     # nothing was marked


@pytest.mark.parametrize("line, reply", [
    (b"RETR", b"-ERR missing argument\r\n"),
    (b"DELE", b"-ERR missing argument\r\n"),
    (b"TOP 1", b"-ERR missing argument\r\n"),
    (b"RETR 1 2", b"-ERR too many arguments\r\n"),
    (b"DELE 1 1", b"-ERR too many arguments\r\n"),
    (b"LIST 1 2", b"-ERR too many arguments\r\n"),
    (b"TOP 1 2 3", b"-ERR too many arguments\r\n"),
    (b"STAT 1", b"-ERR too many arguments\r\n"),
    (b"RSET now", b"-ERR too many arguments\r\n"),
    (b"QUIT now", b"-ERR too many arguments\r\n"),
    (b"TOP 1 -1", b"-ERR invalid line count: -1\r\n"),
    (b"TOP 1 x", b"-ERR invalid line count: x\r\n"),
    (b"TOP 0 1", b"-ERR no such message\r\n"),
    (b"TOP -3 1", b"-ERR invalid message number: -3\r\n"),
    (b"XTND XMIT", b"-ERR unimplemented\r\n"),
    (b"LAST", b"-ERR unimplemented\r\n"),
    (b"", b"-ERR empty command\r\n"),
    (b"   ", b"-ERR empty command\r\n"),
    (b"ST\0AT", b"-ERR command contains invalid characters\r\n"),
])
def test_argument_errors(line, reply):
    s = logged_in()
    assert talk(s, line + b"\r\n") == reply


def test_retr_requests_the_message_and_answers_with_size():
    s = logged_in()
    s.receive_data(b"RETR 2\r\nSTAT\r\n")
    acts = drain(s)
    assert acts == [Retrieve(2, MESSAGES[1], None), PAUSED]
    assert s.retrieve_opened() == b"+OK 250 octets\r\n"
    s.retrieve_done()
    assert sent(drain(s)) == b"+OK 3 357\r\n"


def test_top_request_carries_line_count():
    s = logged_in()
    s.receive_data(b"TOP 1 0\r\n")
    assert drain(s) == [Retrieve(1, MESSAGES[0], 0), PAUSED]
    assert s.retrieve_opened() == b"+OK top of message follows\r\n"
    s.retrieve_done()


def test_retr_of_vanished_file():
    s = logged_in()
    s.receive_data(b"RETR 3\r\n")
    drain(s)
    s.retrieve_failed()
    assert sent(drain(s)) == b"-ERR [SYS/TEMP] message 3 has vanished from the mailbox\r\n"


def test_quit_requests_update_with_marks():
    s = logged_in()
    s.receive_data(b"DELE 1\r\nDELE 3\r\nQUIT\r\n")
    acts = drain(s)
    assert acts[-2] == Update((MESSAGES[0], MESSAGES[2]), (MESSAGES[1],))
    s.update_done(0)
    assert drain(s) == [Send(b"+OK signing off\r\n"), Close("quit"), PAUSED]


def test_quit_update_failure_is_reported():
    s = logged_in()
    s.receive_data(b"DELE 1\r\nQUIT\r\n")
    drain(s)
    s.update_done(1)
    assert sent(drain(s)) == b"-ERR [SYS/TEMP] some deleted messages were not removed\r\n"


def test_rset_without_quit_means_nothing_deleted():
    s = logged_in()
    s.receive_data(b"DELE 1\r\nRSET\r\nQUIT\r\n")
    acts = drain(s)
    assert acts[-2] == Update((), tuple(MESSAGES))


def test_empty_mailbox():
    s = logged_in(messages=[])
    assert talk(s, b"STAT\r\n") == b"+OK 0 0\r\n"
    assert talk(s, b"LIST\r\n") == b"+OK 0 messages (0 octets)\r\n.\r\n"
    assert talk(s, b"RETR 1\r\n") == b"-ERR no such message\r\n"


def test_ten_thousand_messages_list_and_uidl():
    msgs = [Msg(f"id{i}", 10240) for i in range(10_000)]
    s = logged_in(messages=msgs)
    out = talk(s, b"LIST\r\n")
    assert out.count(b"\r\n") == 10_002 and out.endswith(b"10000 10240\r\n.\r\n")
    assert talk(s, b"STAT\r\n") == b"+OK 10000 102400000\r\n"
    assert talk(s, b"DELE 10000\r\n") == b"+OK message 10000 deleted\r\n"
    assert talk(s, b"UIDL\r\n").endswith(b"9999 id9998\r\n.\r\n")


# --- line handling and limits ----------------------------------------------------------------

def test_case_insensitive_and_bare_lf():
    s = logged_in()
    assert talk(s, b"stat\n") == b"+OK 3 357\r\n"
    assert talk(s, b"LiSt 1\n") == b"+OK 1 100\r\n"


def test_command_split_across_reads():
    s = logged_in()
    for piece in (b"ST", b"A", b"T\r"):
        assert talk(s, piece) == b""
    assert talk(s, b"\n") == b"+OK 3 357\r\n"


def test_line_limit_is_rfc2449_255_octets_including_crlf():
    s = new_session()
    ok = b"USER " + b"a" * (core.MAX_LINE - 7) + b"\r\n"
    assert len(ok) == core.MAX_LINE
    assert talk(s, ok) == b"+OK\r\n"
    too_long = b"USER " + b"a" * (core.MAX_LINE - 6) + b"\r\n"
    assert talk(s, too_long) == b"-ERR command line too long\r\n"


def test_overlong_line_without_newline_is_answered_and_skipped():
    s = new_session()
    assert talk(s, b"X" * 1000) == b"-ERR command line too long\r\n"
    assert talk(s, b"Y" * 5000) == b""                   # still the same line: dropped
    assert s.pending_input == 0                          # nothing accumulates
    assert talk(s, b"ZZZ\r\nNOOP\r\n") == b"+OK\r\n"


def test_too_many_bad_commands_close():
    s = new_session()
    acts = []
    for _ in range(core.MAX_BAD_COMMANDS):
        s.receive_data(b"BOGUS\r\n")
        acts = drain(s)
    assert sent(acts) == b"-ERR too many bad commands: closing\r\n"
    assert Close("too many bad commands") in acts


def test_timeout_closes_and_late_completion_is_ignored():
    s = new_session()
    s.receive_data(b"USER a\r\nPASS b\r\n")
    drain(s)
    s.timed_out()
    assert drain(s) == [Send(b"-ERR autologout: idle for too long\r\n"), Close("timeout"), PAUSED]
    s.login_succeeded(MESSAGES)             # the check finished after the timeout
    assert drain(s) == [PAUSED]
    s.receive_data(b"STAT\r\n")
    assert drain(s) == [PAUSED]


def test_completion_for_the_wrong_request_is_a_bug():
    s = new_session()
    with pytest.raises(RuntimeError):
        s.login_succeeded(MESSAGES)
    s2 = logged_in()
    with pytest.raises(RuntimeError):
        s2.retrieve_opened()
    with pytest.raises(RuntimeError):
        s2.update_done(0)


def test_parse_number():
    assert parse_number(b"1") == 1 and parse_number(b"007") == 7
    for bad in (b"", b"-1", b"+1", b" 1", b"1e3", b"\xd9\xa1", b"9" * 10):
        assert parse_number(bad) is None


def test_escape_login_keeps_log_line_single_and_unforgeable():
    assert escape_login("test@test.com") == "test@test.com"
    esc = escape_login('x\r\nrip=1.2.3.4 "<>\\\u00e9\u4e2d')
    assert "\r" not in esc and "\n" not in esc and " " not in esc and '"' not in esc
    assert esc == 'x\\x0d\\x0arip=1.2.3.4\\x20\\x22\\x3c\\x3e\\x5c\\xe9\\u4e2d'
    assert escape_login("a" * 500).endswith("...") and len(escape_login("a" * 500)) == 103


# --- the encoder -----------------------------------------------------------------------------

def reference(msg: bytes, body_lines: int | None = None) -> bytes:
    """Line by line: LF ends a line (one CR before it is dropped), dot-stuff, CRLF."""
    parts = msg.split(b"\n")
    last = parts.pop()
    lines = [p[:-1] if p.endswith(b"\r") else p for p in parts]
    if last:
        lines.append(last)
    if body_lines is not None:
        for i, line in enumerate(lines):
            if line == b"":
                lines = lines[:i + 1 + body_lines]
                break
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines) + b".\r\n"


def encode_in_chunks(msg: bytes, cuts: list[int], body_lines=None) -> bytes:
    enc = MessageEncoder(body_lines)
    out, prev = [], 0
    for c in sorted(set(cuts)) + [len(msg)]:
        if enc.done:
            break
        out.append(enc.feed(msg[prev:c]))
        prev = c
    out.append(enc.finish())
    return b"".join(out)


@pytest.mark.parametrize("msg, wire", [
    (b"", b".\r\n"),
    (b"a\n", b"a\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b".\n", b"..\r\n.\r\n"),
    (b"a\n.\n..x\n", b"a\r\n..\r\n...x\r\n.\r\n"),
    (b"bare\rcr\n", b"bare\rcr\r\n.\r\n"),
    (b"x\r", b"x\r\r\n.\r\n"),
])
def test_encode_examples(msg, wire):
    assert encode_whole(msg) == wire == reference(msg)


@settings(max_examples=300, deadline=None)
@given(st.binary().map(lambda b: bytes(b"a.\r\n"[x % 4] for x in b)),
       st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_encoder_matches_reference_for_any_chunking(msg, cuts):
    cuts = [c for c in cuts if c <= len(msg)]
    wire = encode_in_chunks(msg, cuts)
    assert wire == reference(msg)
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    # The terminator appears exactly once: at the end (no early end of message).
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3


@settings(max_examples=300, deadline=None)
@given(st.binary().map(lambda b: bytes(b"a.\r\n"[x % 4] for x in b)))
def test_fast_path_matches_reference(msg):
    assert encode_whole(msg) == reference(msg)
    assert encode_whole(msg.replace(b"\r", b"")) == reference(msg.replace(b"\r", b""))


@settings(max_examples=300, deadline=None)
@given(st.binary().map(lambda b: bytes(b"a.\r\n"[x % 4] for x in b)),
       st.lists(st.integers(min_value=0, max_value=200), max_size=8),
       st.integers(min_value=0, max_value=5))
def test_top_matches_reference_for_any_chunking(msg, cuts, n):
    cuts = [c for c in cuts if c <= len(msg)]
    assert encode_in_chunks(msg, cuts, n) == reference(msg, n)


def test_top_stops_reading_early():
    enc = MessageEncoder(1)
    out = enc.feed(b"Subject: x\r\n\r\nline1\r\nline2\r\n")
    assert enc.done and out == b"Subject: x\r\n\r\nline1\r\n"
    assert enc.feed(b"more\n") == b""
    assert enc.finish() == b".\r\n"


def test_top_zero_lines_and_no_body():
    assert encode_in_chunks(b"A: 1\nB: 2\n\nbody\n", [], 0) == b"A: 1\r\nB: 2\r\n\r\n.\r\n"
    assert encode_in_chunks(b"A: 1\nB: 2\n", [], 3) == b"A: 1\r\nB: 2\r\n.\r\n"
