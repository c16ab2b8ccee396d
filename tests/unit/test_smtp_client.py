"""smtp/client.py: the sans-IO ESMTP client (conversation table, replies, DATA encoding)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from mailappliance.envelope import DEFERRAL, FAILURE, SUCCESS
from mailappliance.smtp import client as sc
from mailappliance.smtp.client import (Close, ClientCore, DataEncoder, ProtocolError,
                                       ReplyParser, Send, SendBody, StartTLS)

EHLO_PIPE = (b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n"
             b"250-8BITMIME\r\n250 STARTTLS\r\n")
EHLO_PLAIN = b"250-mx.example.org\r\n250 SIZE\r\n"


def core(rcpts=("a@x.example", "b@x.example"), sender="s@test.com", size=100, tls=False):
    return ClientCore(helo="mail.test.com", sender=sender, recipients=list(rcpts), size=size,
                      host="192.0.2.1", tls_available=tls)


def sent(actions):
    return b"".join(a.data for a in actions if isinstance(a, Send))


def test_pipelined_transaction_sends_mail_rcpts_data_in_one_write():
    c = core()
    assert sent(c.receive_data(b"220 mx ESMTP\r\n")) == b"EHLO mail.test.com\r\n"
    acts = c.receive_data(EHLO_PIPE)
    assert acts == [Send(b"MAIL FROM:<s@test.com> SIZE=100 BODY=8BITMIME\r\n"
                         b"RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n")]
    acts = c.receive_data(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert acts == [SendBody()]
    c.body_done()
    assert sent(c.receive_data(b"250 ok 12345 qp 9\r\n")) == b"QUIT\r\n"
    assert c.receive_data(b"221 bye\r\n") == [Close()]
    assert c.done
    assert [(r.status, r.text) for r in c.results] == [
        (SUCCESS, "192.0.2.1 accepted message.\nRemote host said: 250 ok 12345 qp 9")] * 2


def test_without_pipelining_commands_go_one_at_a_time():
    c = core()
    c.receive_data(b"220 mx\r\n")
    assert sent(c.receive_data(EHLO_PLAIN)) == b"MAIL FROM:<s@test.com> SIZE=100\r\n"
    assert sent(c.receive_data(b"250 ok\r\n")) == b"RCPT TO:<a@x.example>\r\n"
    assert sent(c.receive_data(b"550 no such user\r\n")) == b"RCPT TO:<b@x.example>\r\n"
    assert sent(c.receive_data(b"250 ok\r\n")) == b"DATA\r\n"
    assert c.receive_data(b"354 go\r\n") == [SendBody()]
    c.body_done()
    c.receive_data(b"250 queued\r\n")
    a, b = c.results
    assert a.status == FAILURE
    assert a.text == "192.0.2.1 does not like recipient.\nRemote host said: 550 no such user"
    assert b.status == SUCCESS


def test_per_recipient_results_2xx_4xx_5xx():
    c = core(rcpts=("ok@x", "later@x", "never@x"))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    assert c.receive_data(b"250 ok\r\n250 ok\r\n451 try later\r\n550 unknown\r\n354 go\r\n") \
        == [SendBody()]
    c.body_done()
    c.receive_data(b"250 ok\r\n")
    assert [r.status for r in c.results] == [SUCCESS, DEFERRAL, FAILURE]


def test_nobody_accepted_without_pipelining_never_sends_data():
    c = core(rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PLAIN)
    c.receive_data(b"250 ok\r\n")
    assert sent(c.receive_data(b"550 no\r\n")) == b"QUIT\r\n"
    assert c.results[0].status == FAILURE


def test_pipelined_all_rejected_but_354_ends_data_empty():
    c = core(rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    assert sent(c.receive_data(b"250 ok\r\n550 no\r\n354 go\r\n")) == b".\r\n"
    assert sent(c.receive_data(b"554 no valid recipients\r\n")) == b"QUIT\r\n"
    assert c.results[0].status == FAILURE


@pytest.mark.parametrize("code,status", [(b"553", FAILURE), (b"451", DEFERRAL)])
def test_sender_rejected_applies_to_all(code, status):
    c = core()
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    acts = c.receive_data(code + b" sender refused\r\n503 no\r\n503 no\r\n503 no\r\n")
    assert sent(acts) == b"QUIT\r\n"
    assert {r.status for r in c.results} == {status}
    assert c.results[0].text.startswith("Connected to 192.0.2.1 but sender was rejected.")
    assert not c.try_next_host


@pytest.mark.parametrize("code,status", [(b"554", FAILURE), (b"451", DEFERRAL)])
def test_data_rejected(code, status):
    c = core(rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    c.receive_data(b"250 ok\r\n250 ok\r\n" + code + b" no data\r\n")
    assert c.results[0].status == status
    assert c.results[0].text.startswith("192.0.2.1 failed on DATA command.")


@pytest.mark.parametrize("code,status", [(b"552", FAILURE), (b"452", DEFERRAL)])
def test_rejected_after_the_message(code, status):
    c = core(rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    c.body_done()
    c.receive_data(code + b" too big\r\n")
    assert c.results[0].status == status
    assert c.results[0].text == ("192.0.2.1 failed after I sent the message.\n"
                                 "Remote host said: " + code.decode() + " too big")


def test_ehlo_refused_falls_back_to_helo_without_extensions():
    c = core(rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    assert sent(c.receive_data(b"502 what\r\n")) == b"HELO mail.test.com\r\n"
    assert sent(c.receive_data(b"250 hi\r\n")) == b"MAIL FROM:<s@test.com>\r\n"


def test_helo_refused_tries_next_host():
    c = core()
    c.receive_data(b"220 mx\r\n")
    c.receive_data(b"502 no\r\n")
    assert sent(c.receive_data(b"550 go away\r\n")) == b"QUIT\r\n"
    assert c.try_next_host and {r.status for r in c.results} == {DEFERRAL}


def test_greeting_failure_tries_next_host():
    c = core()
    assert sent(c.receive_data(b"421 busy\r\n")) == b"QUIT\r\n"
    assert c.try_next_host
    assert c.results[0].text == ("Connected to 192.0.2.1 but greeting failed.\n"
                                 "Remote host said: 421 busy")


def test_starttls_when_offered_then_ehlo_again_and_no_second_starttls():
    c = core(tls=True)
    c.receive_data(b"220 mx\r\n")
    assert sent(c.receive_data(EHLO_PIPE)) == b"STARTTLS\r\n"
    assert c.receive_data(b"220 go ahead\r\n") == [StartTLS()]
    assert sent(c.tls_started()) == b"EHLO mail.test.com\r\n"
    assert sent(c.receive_data(EHLO_PIPE)).startswith(b"MAIL FROM:")
    assert c.tls_active


def test_starttls_refused_continues_in_clear():
    c = core(tls=True)
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    assert sent(c.receive_data(b"454 TLS not available\r\n")).startswith(b"MAIL FROM:")


def test_no_starttls_when_adapter_has_no_tls():
    c = core(tls=False)
    c.receive_data(b"220 mx\r\n")
    assert sent(c.receive_data(EHLO_PIPE)).startswith(b"MAIL FROM:")


def test_size_limit_fails_without_sending_the_message():
    c = core(size=2_000_000)
    c.receive_data(b"220 mx\r\n")
    assert sent(c.receive_data(EHLO_PIPE)) == b"QUIT\r\n"
    assert {r.status for r in c.results} == {FAILURE}
    assert "size limit of 1000000 bytes. (#5.3.4)" in c.results[0].text


def test_smtputf8_used_when_needed_and_offered_else_failure():
    c = core(rcpts=("jörg@x.example",))
    c.receive_data(b"220 mx\r\n")
    assert sent(c.receive_data(b"250-mx\r\n250 SMTPUTF8\r\n")) == \
        "MAIL FROM:<s@test.com> SMTPUTF8\r\n".encode()
    c = core(rcpts=("jörg@x.example",))
    c.receive_data(b"220 mx\r\n")
    assert sent(c.receive_data(EHLO_PLAIN)) == b"QUIT\r\n"
    assert c.results[0].status == FAILURE


@pytest.mark.parametrize("sender", ["", "#@[]"])
def test_null_and_double_bounce_senders_are_sent_as_null_path(sender):
    c = core(sender=sender, rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    assert sent(c.receive_data(EHLO_PLAIN)) == b"MAIL FROM:<> SIZE=100\r\n"


def test_connection_lost_before_transaction_tries_next_host():
    c = core()
    c.receive_data(b"220 mx\r\n")
    c.connection_lost()
    assert c.try_next_host and c.done
    assert c.results[0].text == "Connected to 192.0.2.1 but connection died. (#4.4.2)"


def test_connection_lost_after_data_is_a_deferral_for_the_same_host():
    c = core(rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    c.body_done()
    c.connection_lost()
    assert not c.try_next_host and c.results[0].status == DEFERRAL


def test_reply_to_nothing_ends_the_session():
    """A reply we did not ask for could later pass for the answer to RCPT or DATA."""
    c = core(rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PLAIN)                      # MAIL sent, one reply owed
    acts = c.receive_data(b"250 ok\r\n250 sneaky extra\r\n354 go\r\n")
    assert SendBody() not in acts
    assert sent(acts).endswith(b"QUIT\r\n")
    assert c.results[0].status == DEFERRAL
    assert "malformed or oversized reply" in c.results[0].text


def test_replies_ahead_of_our_commands_are_refused():
    c = core()
    acts = c.receive_data(b"220 mx\r\n250-a\r\n250 b\r\n")
    assert sent(acts).endswith(b"QUIT\r\n")
    assert c.results[0].status == DEFERRAL


def test_reply_while_we_send_the_message_hangs_up_without_a_command():
    c = core(rcpts=("a@x",))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    assert c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n") == [SendBody()]
    assert c.receive_data(b"250 ok already\r\n") == [Close()]
    assert c.results[0].status == DEFERRAL and c.done


def test_malformed_reply_is_a_protocol_error():
    c = core()
    acts = c.receive_data(b"hello there\r\n")
    assert sent(acts) == b"QUIT\r\n"
    assert "malformed or oversized reply" in c.results[0].text


# --- the reply parser ---------------------------------------------------------------------------

def test_multiline_reply_split_anywhere():
    data = b"250-first\r\n250-second\r\n250 last\r\n"
    for cut in range(len(data)):
        p = ReplyParser()
        replies = p.feed(data[:cut]) + p.feed(data[cut:])
        assert [(r.code, r.lines) for r in replies] == [(250, ("first", "second", "last"))]


def test_overlong_line_is_cut_not_buffered():
    p = ReplyParser()
    for _ in range(1000):
        assert p.feed(b"x" * 10_000) == []
    assert len(p._line) <= sc.MAX_REPLY_LINE
    with pytest.raises(ProtocolError):
        p.feed(b"\r\n")                   # 'xxx...' is not a reply line
    p = ReplyParser()
    [r] = p.feed(b"250 " + b"y" * 100_000 + b"\r\n")
    assert len(r.lines[0]) <= sc.MAX_REPLY_LINE


def test_too_many_lines_in_one_reply():
    p = ReplyParser()
    with pytest.raises(ProtocolError):
        p.feed(b"250-x\r\n" * (sc.MAX_REPLY_LINES + 1))


def test_reply_code_must_not_change_mid_reply():
    with pytest.raises(ProtocolError):
        ReplyParser().feed(b"250-x\r\n550 y\r\n")


def test_control_characters_in_replies_are_neutralised():
    [r] = ReplyParser().feed(b"550 bad\x1b[31m\x00 user\r\n")
    assert r.text == "550 bad?[31m? user"


# --- DATA encoding --------------------------------------------------------------------------------

def encode_all(chunks):
    e = DataEncoder()
    return b"".join(e.encode(c) for c in chunks) + e.finish()


def test_dot_stuffing_and_crlf():
    assert encode_all([b"a\n.b\n..c\n.\n"]) == b"a\r\n..b\r\n...c\r\n..\r\n.\r\n"
    assert encode_all([b".start"]) == b"..start\r\n.\r\n"
    assert encode_all([]) == b".\r\n"


def test_smuggling_sequences_cannot_end_data():
    evil = [b"x\n.\nMAIL FROM:<a@b>\n", b"y\r.\r", b"z\r\n.\r\nRCPT", b"\n.", b"\r", b"\n"]
    out = encode_all(evil)
    assert out.count(b"\r\n.\r\n") == 1 and out.endswith(b"\r\n.\r\n")


def test_crlf_split_across_chunks_stays_one_line_end():
    assert encode_all([b"a\r", b"\nb\n"]) == b"a\r\nb\r\n.\r\n"
    assert encode_all([b"a\r", b"\r\n"]) == b"a\r\n\r\n.\r\n"


def unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(l[1:] if l.startswith(b".") else l for l in lines)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300).map(lambda b: b.replace(b"a", b".").replace(b"b", b"\r")
                                         .replace(b"c", b"\n")),
       cuts=st.lists(st.integers(0, 300), max_size=6))
def test_encoder_properties(data, cuts):
    pieces, last = [], 0
    for c in sorted(set(cuts)):
        pieces.append(data[last:c])
        last = c
    pieces.append(data[last:])
    out = encode_all(pieces)
    # exactly one end-of-data, at the end; no bare CR or LF anywhere
    assert (b"\r\n" + out).count(b"\r\n.\r\n") == 1
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", out) is None
    # un-stuffing gives the input with every line end as CRLF
    normal = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if normal and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    assert unstuff(out) == normal


# --- time: what the core waits for, and a deadline passing (the adapter keeps the clock) -----

def test_awaiting_names_each_reply_and_only_complete_replies_count():
    c = core(rcpts=("a@x.example",), tls=True)
    seen = [(c.awaiting, c.replies_received)]

    def step(action):
        action()
        seen.append((c.awaiting, c.replies_received))
    step(lambda: c.receive_data(b"220 mx\r\n"))
    step(lambda: c.receive_data(EHLO_PIPE))                 # offers STARTTLS
    step(lambda: c.receive_data(b"220 go ahead\r\n"))      # the adapter shakes hands now
    step(c.tls_started)                                      # EHLO again
    step(lambda: c.receive_data(b"250-mx.example.org\r\n250 SI"))   # half a reply: nothing
    step(lambda: c.receive_data(b"ZE\r\n"))
    assert seen == [("greeting", 0), ("EHLO", 1), ("STARTTLS", 2), ("STARTTLS", 3),
                    ("EHLO", 3), ("EHLO", 3), ("MAIL", 4)]


def test_awaiting_through_a_pipelined_transaction():
    c = core(rcpts=("a@x.example", "b@x.example"))
    c.receive_data(b"220 mx\r\n")
    c.receive_data(EHLO_PIPE)
    stages = [c.awaiting]
    for reply in (b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        c.receive_data(reply)
        stages.append(c.awaiting)
    c.body_done()
    stages.append(c.awaiting)
    c.receive_data(b"250 queued\r\n")
    stages.append(c.awaiting)
    c.receive_data(b"221 bye\r\n")
    stages.append(c.awaiting)
    assert stages == ["MAIL", "RCPT", "RCPT", "DATA", "message", "end of data", "QUIT", None]
    assert c.replies_received == 8
    assert all(s is None or s in sc.REPLY_DEADLINES for s in stages)


@pytest.mark.parametrize("feed, text, next_host", [
    ([], "Connected to 192.0.2.1 but it sent its greeting too slowly: not complete within "
         "300 s. (#4.4.2)", True),
    ([b"220 mx\r\n"], "Connected to 192.0.2.1 but it sent its reply to EHLO too slowly: not "
                      "complete within 300 s. (#4.4.2)", True),
    ([b"220 mx\r\n", EHLO_PLAIN], "Connected to 192.0.2.1 but it sent its reply to MAIL too "
                                  "slowly: not complete within 300 s. (#4.4.2)", False),
    ([b"220 mx\r\n", EHLO_PLAIN, b"250 ok\r\n"], "Connected to 192.0.2.1 but it sent its reply "
     "to RCPT too slowly: not complete within 300 s. (#4.4.2)", False),
])
def test_deadline_passed_defers_with_the_reply_named(feed, text, next_host):
    c = core(rcpts=("a@x.example",))
    for chunk in feed:
        c.receive_data(chunk)
    assert c.deadline_passed(300) == [Close()]
    assert c.done and c.try_next_host is next_host
    assert [(r.status, r.text) for r in c.results] == [(DEFERRAL, text)]
    assert c.deadline_passed(300) == []                 # once only
    c.connection_lost()
    assert c.results[0].text == text                    # the loss does not overwrite it


def test_deadline_after_the_message_keeps_the_accepted_results_and_names_it():
    c = core(rcpts=("a@x.example", "b@x.example"))
    for chunk in (b"220 mx\r\n", EHLO_PIPE, b"250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n"):
        c.receive_data(chunk)
    assert c.awaiting == "message"
    c.body_done()
    c.deadline_passed(600)
    a, b = c.results
    assert a.status == FAILURE                           # the 550 stands
    assert (b.status, b.text) == (DEFERRAL, "Connected to 192.0.2.1 but it sent its reply to "
                                  "the message too slowly: not complete within 600 s. (#4.4.2)")
    assert not c.try_next_host


def test_deadline_while_sending_and_for_the_whole_attempt():
    c = core(rcpts=("a@x.example",))
    for chunk in (b"220 mx\r\n", EHLO_PIPE, b"250 ok\r\n250 ok\r\n354 go\r\n"):
        c.receive_data(chunk)
    c.deadline_passed(180)
    assert c.results[0].text == ("Connected to 192.0.2.1 but it took in the message too "
                                 "slowly: 180 s without enough progress. (#4.4.2)")
    c = core(rcpts=("a@x.example",))
    c.receive_data(b"220 mx\r\n")
    c.deadline_passed(3600, whole_attempt=True)
    assert c.results[0].text == ("Connected to 192.0.2.1 but the delivery attempt took longer "
                                 "than 3600 s; gave up. (#4.4.2)")
    assert c.try_next_host                               # the adapter tries no more: no time


def test_deadline_after_a_refused_greeting_keeps_the_next_host():
    c = core()
    c.receive_data(b"554 go away\r\n")                   # QUIT sent, next host wanted
    assert c.awaiting == "QUIT"
    c.deadline_passed(300)
    assert c.try_next_host
    assert "greeting failed" in c.results[0].text
