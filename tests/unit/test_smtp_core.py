"""The sans-IO SMTP server core: every command, every error reply, pipelining order, DATA."""

from __future__ import annotations

import re

import pytest

from mailappliance.smtp import core, replies
from mailappliance.smtp.core import (
    CLOSED_EVENT, NEED_DATA, PAUSED, Auth, AuthResponse, DataChunk, DataStart, Handled, Hello,
    MailFrom, MessageEnd, ProtocolUsageError, Quit, RcptTo, Reset, ServerConnection, StartTLS,
    received_header)

HOST = "mx.test.com"


class Driver:
    """Answers events the way a simple adapter would: RCPT per `rcpt` (default accept), message
    end with "250 ok 1 qp N". Records events, chunks and the output bytes."""

    def __init__(self, greet=True, rcpt=None, **kw):
        kw.setdefault("databytes", 10_000)
        kw.setdefault("max_recipients", 5)
        self.conn = ServerConnection(HOST, **kw)
        self.out = b""
        self.events = []
        self.chunks = []
        self.ends = []
        self.rcpt = rcpt or (lambda ev: replies.RCPT_OK)
        self.qid = 0
        if greet:
            self.out += self.conn.send(replies.greeting(HOST))

    def answer(self, ev):
        if isinstance(ev, RcptTo):
            return self.rcpt(ev)
        if isinstance(ev, MessageEnd):
            self.ends.append(ev)
            if ev.reply is not None:
                return ev.reply
            self.qid += 1
            return replies.queued(1, str(self.qid))
        return ev.reply

    def feed(self, data: bytes) -> bytes:
        before = len(self.out)
        self.conn.receive_data(data)
        self.pump()
        return self.out[before:]

    def pump(self):
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA or ev is PAUSED or ev is CLOSED_EVENT:
                return ev
            self.events.append(ev)
            if isinstance(ev, DataChunk):
                self.chunks.append(ev.data)
                continue
            self.out += self.conn.send(self.answer(ev))

    def lines(self):
        return self.out.decode().split("\r\n")[:-1]

    def codes(self):
        """Reply codes of the final line of each reply, in order (greeting included)."""
        return [int(line[:3]) for line in self.lines() if line[3:4] != "-"]


def session(data: bytes, **kw) -> Driver:
    d = Driver(**kw)
    d.feed(data)
    return d


# --- greeting and simple commands ------------------------------------------------------------

def test_greeting_is_qmail_style():
    assert Driver().out == b"220 mx.test.com ESMTP\r\n"


@pytest.mark.parametrize("line, reply", [
    (b"HELO client.example", b"250 mx.test.com\r\n"),
    (b"helo client.example", b"250 mx.test.com\r\n"),
    (b"HELO", b"501 sorry, HELO and EHLO need a host name (#5.5.4)\r\n"),
    (b"NOOP", b"250 ok\r\n"),
    (b"NOOP anything at all", b"250 ok\r\n"),
    (b"RSET", b"250 flushed\r\n"),
    (b"RSET x", b"501 sorry, this command takes no arguments (#5.5.4)\r\n"),
    (b"VRFY postmaster", b"252 send some mail, i'll try my best\r\n"),
    (b"VRFY nosuchuser@test.com", b"252 send some mail, i'll try my best\r\n"),
    (b"EXPN staff", b"502 unimplemented (#5.5.1)\r\n"),
    (b"HELP", b"214 mailappliance: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n"),
    (b"TURN", b"502 unimplemented (#5.5.1)\r\n"),
    (b"BDAT 10 LAST", b"502 unimplemented (#5.5.1)\r\n"),
    (b"STARTTLS", b"502 unimplemented (#5.5.1)\r\n"),             # not offered
    (b"AUTH PLAIN AGZvbwBiYXI=", b"502 unimplemented (#5.5.1)\r\n"),  # not offered
    (b"MAIL FROM:<a@b.example>", b"250 ok\r\n"),
    (b"MAIL TO:<a@b.example>", b"555 syntax error (#5.5.4)\r\n"),
    (b"MAIL FROM:<a@b.example", b"555 syntax error (#5.5.4)\r\n"),
    (b"RCPT TO:<a@test.com>", b"503 MAIL first (#5.5.1)\r\n"),
    (b"DATA", b"503 MAIL first (#5.5.1)\r\n"),
    (b"", b"502 unimplemented (#5.5.1)\r\n"),
])
def test_single_command_replies_after_helo(line, reply):
    d = Driver()
    d.feed(b"HELO c\r\n")
    assert d.feed(line + b"\r\n") == reply


def test_ehlo_advertises_the_extensions_and_enables_enhanced_codes():
    d = Driver(databytes=12345)
    out = d.feed(b"EHLO client.example\r\n")
    assert out == (b"250-mx.test.com\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 12345\r\n"
                   b"250 ENHANCEDSTATUSCODES\r\n")
    assert d.feed(b"NOOP\r\n") == b"250 2.0.0 ok\r\n"
    assert d.feed(b"EXPN x\r\n") == b"502 5.5.1 unimplemented (#5.5.1)\r\n"
    assert d.conn.helo == "client.example"


def test_ehlo_offers_starttls_and_auth_only_when_configured():
    d = Driver(starttls_offered=True, auth_mechanisms=("PLAIN", "LOGIN"))
    out = d.feed(b"EHLO c\r\n").decode()
    assert "250-STARTTLS\r\n" in out and "250 AUTH PLAIN LOGIN\r\n" in out


def test_quit_says_goodbye_and_closes():
    d = Driver()
    assert d.feed(b"QUIT\r\nNOOP\r\n") == b"221 mx.test.com\r\n"
    assert d.conn.closed
    assert d.conn.next_event() is CLOSED_EVENT
    d.conn.receive_data(b"NOOP\r\n")              # ignored after close, not buffered
    assert d.conn.buffered == 0


# --- MAIL / RCPT / DATA sequence --------------------------------------------------------------

def test_full_transaction_with_envelope_in_message_end():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<Sender@Example.ORG>\r\nRCPT TO:<a@test.com>\r\n"
           b"RCPT TO:<Postmaster>\r\nDATA\r\n")
    assert d.codes() == [220, 250, 250, 250, 250, 354]
    d.feed(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert d.lines()[-1] == "250 2.0.0 ok 1 qp 1"
    (end,) = d.ends
    assert end.sender == "Sender@example.org"
    assert end.recipients == ("a@test.com", "postmaster@mx.test.com")
    assert b"".join(d.chunks) == b"Subject: hi\n\nbody\n"
    assert end.size == len(b"Subject: hi\n\nbody\n")
    assert not d.conn.in_transaction


def test_null_sender_is_empty_string():
    d = session(b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@test.com>\r\nDATA\r\nx\r\n.\r\n")
    assert d.ends[0].sender == ""


def test_rcpt_event_carries_the_parsed_path_and_no_default_reply():
    d = Driver()
    d.feed(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n")
    d.conn.receive_data(b"RCPT TO:<@relay.example:u@test.com>\r\n")
    ev = d.conn.next_event()
    assert isinstance(ev, RcptTo) and ev.reply is None
    assert str(ev.recipient) == "u@test.com" and ev.path.route == ("relay.example",)


@pytest.mark.parametrize("commands, last", [
    (b"MAIL FROM:<a@b.example>\r\nMAIL FROM:<c@d.example>\r\n",
     "503 nested MAIL command (#5.5.1)"),
    (b"MAIL FROM:<a@b.example>\r\nDATA\r\n", "503 RCPT first (#5.5.1)"),
    (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@test.com>\r\nDATA x\r\n",
     "501 sorry, this command takes no arguments (#5.5.4)"),
    (b"MAIL FROM:<a@b.example> SIZE=10001\r\n",
     "552 sorry, that message size exceeds my databytes limit (#5.3.4)"),
    (b"MAIL FROM:<a@b.example> SIZE=10000 BODY=8BITMIME\r\n", "250 ok"),
    (b"MAIL FROM:<a@b.example> BODY=7bit\r\n", "250 ok"),
    (b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n",
     "555 sorry, unsupported MAIL or RCPT parameter (#5.5.4)"),
    (b"MAIL FROM:<a@b.example> SIZE=x\r\n",
     "555 sorry, unsupported MAIL or RCPT parameter (#5.5.4)"),
    (b"MAIL FROM:<a@b.example> AUTH=<>\r\n",
     "555 sorry, unsupported MAIL or RCPT parameter (#5.5.4)"),     # AUTH not offered
    (b"MAIL FROM:<a@b.example> RET=HDRS\r\n",
     "555 sorry, unsupported MAIL or RCPT parameter (#5.5.4)"),     # no DSN
    (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@test.com> NOTIFY=NEVER\r\n",
     "555 sorry, unsupported MAIL or RCPT parameter (#5.5.4)"),
    (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@test.com\r\n", "555 syntax error (#5.5.4)"),
    (b"MAIL FROM:<a@b.example>\r\nRCPT FROM:<a@test.com>\r\n", "555 syntax error (#5.5.4)"),
    (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<" + b"x" * 65 + b"@test.com>\r\n",
     "553 sorry, that address is too long (#5.1.3)"),
    (b"MAIL FROM:<a@b.example>\r\nRSET\r\nRCPT TO:<a@test.com>\r\n", "503 MAIL first (#5.5.1)"),
    (b"MAIL FROM:<a@b.example>\r\nHELO again\r\nRCPT TO:<a@test.com>\r\n",
     "503 MAIL first (#5.5.1)"),    # RFC 5321 4.1.4: HELO resets the transaction
])
def test_sequence_and_parameter_errors(commands, last):
    d = session(b"HELO c\r\n" + commands)
    assert d.lines()[-1] == last


def test_refused_rcpt_does_not_count_and_data_needs_an_accepted_one():
    d = Driver(rcpt=lambda ev: replies.NOT_IN_RCPTHOSTS)
    d.feed(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@remote.example>\r\nDATA\r\n")
    assert d.lines()[-2:] == [
        "553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)",
        "503 RCPT first (#5.5.1)"]


def test_max_recipients_gives_452_for_the_extra_ones():
    d = Driver(max_recipients=3)
    d.feed(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n"
           + b"".join(b"RCPT TO:<u%d@test.com>\r\n" % i for i in range(5)) + b"DATA\r\n")
    assert d.codes()[3:] == [250, 250, 250, 452, 452, 354]
    assert d.lines()[6] == "452 sorry, too many recipients (#4.5.3)"
    d.feed(b"x\r\n.\r\n")
    assert len(d.ends[0].recipients) == 3


# --- pipelining -------------------------------------------------------------------------------

def test_pipelined_replies_stay_in_order_while_a_rcpt_decision_is_pending():
    """RFC 2920: the core hands out no further event until the pending one is answered, so an
    adapter that decides RCPT asynchronously still answers in command order."""
    conn = ServerConnection(HOST, databytes=1000, max_recipients=10)
    out = [conn.send(replies.greeting(HOST))]
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<slow@test.com>\r\n"
                      b"RCPT TO:<fast@test.com>\r\nNOOP\r\n")
    for _ in range(2):
        ev = conn.next_event()
        out.append(conn.send(ev.reply))
    slow = conn.next_event()
    assert isinstance(slow, RcptTo)
    assert conn.next_event() is PAUSED                 # nothing overtakes the pending RCPT
    conn.receive_data(b"QUIT\r\n")
    assert conn.next_event() is PAUSED
    out.append(conn.send(replies.NO_MAILBOX))          # the slow answer arrives
    fast = conn.next_event()
    assert str(fast.recipient) == "fast@test.com"
    out.append(conn.send(replies.RCPT_OK))
    out.append(conn.send(conn.next_event().reply))     # NOOP
    out.append(conn.send(conn.next_event().reply))     # QUIT
    text = b"".join(out).decode()
    assert [line[:3] for line in text.split("\r\n")[:-1] if line[3] == " "] == \
        ["220", "250", "250", "550", "250", "250", "221"]
    assert conn.recipients == (fast.recipient,)


def test_pipelined_transaction_in_one_packet():
    d = session(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<a@test.com>\r\nDATA\r\n"
                b"line\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<b@test.com>\r\nDATA\r\n"
                b"two\r\n.\r\nQUIT\r\n")
    assert d.codes() == [220, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
    assert [e.recipients for e in d.ends] == [("a@test.com",), ("b@test.com",)]
    assert d.chunks == [b"line\n", b"two\n"]


def test_send_without_pending_event_is_a_usage_error():
    d = Driver()
    with pytest.raises(ProtocolUsageError):
        d.conn.send(replies.OK)


# --- command line hygiene ---------------------------------------------------------------------

def test_command_line_of_exactly_1000_octets_is_read():
    d = Driver()
    line = b"NOOP " + b"x" * (core.MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(line) == 1000
    assert d.feed(line) == b"250 ok\r\n"


def test_command_line_over_1000_octets_gets_500_and_the_session_goes_on():
    d = Driver()
    line = b"NOOP " + b"x" * (core.MAX_COMMAND_LINE - 6) + b"\r\n"
    assert len(line) == 1001
    assert d.feed(line + b"NOOP\r\n") == b"500 sorry, command line too long (#5.5.2)\r\n250 ok\r\n"
    assert not d.conn.closed


def test_overlong_line_arriving_in_pieces_costs_bounded_memory():
    d = Driver()
    for _ in range(100):
        assert d.feed(b"x" * 5000) == b""
        assert d.conn.buffered < core.MAX_COMMAND_LINE
    assert d.feed(b"\r\nNOOP\r\n") == b"500 sorry, command line too long (#5.5.2)\r\n250 ok\r\n"


def test_megabytes_without_line_end_are_cut_off_with_421():
    d = Driver()
    out = b""
    for _ in range(40):                                # 2.5 MiB in 64 KiB pieces
        out += d.feed(b"A" * 65536)
        assert d.conn.buffered <= core.MAX_COMMAND_LINE
        if d.conn.closed:
            break
    assert out == b"421 sorry, no line end in sight, closing connection (#4.7.0)\r\n"
    assert d.conn.closed


@pytest.mark.parametrize("data, reply", [
    (b"NO\0OP\r\n", b"501 sorry, NUL in command (#5.5.2)\r\n"),
    (b"NOOP\rx\r\n", b"501 sorry, bare CR in command (#5.5.2)\r\n"),
    (b"NOOP\n", b"501 sorry, commands end in CRLF, not bare LF (#5.5.2)\r\n"),
    (b"MAIL FROM:<a@b\rc>\r\n", b"501 sorry, bare CR in command (#5.5.2)\r\n"),
])
def test_nul_and_bare_cr_lf_in_commands_get_501(data, reply):
    d = Driver()
    assert d.feed(data) == reply
    assert d.feed(b"NOOP\r\n") == b"250 ok\r\n"        # the session goes on


@pytest.mark.parametrize("request_line", [
    b"GET / HTTP/1.1", b"POST /cgi-bin/x HTTP/1.0", b"CONNECT mx.test.com:25 HTTP/1.1",
    b"Host: mx.test.com", b"User-Agent: curl/8",
])
def test_http_requests_get_502_and_close(request_line):
    d = Driver()
    out = d.feed(request_line + b"\r\nHost: x\r\n\r\n")
    assert out == b"502 sorry, this is an SMTP server, not a web server (#5.5.1)\r\n"
    assert d.conn.closed


def test_talking_before_the_greeting_is_refused():
    d = Driver(greet=False)
    d.conn.receive_data(b"EHLO eager\r\n")
    ev = d.conn.next_event()
    assert isinstance(ev, Handled) and ev.reply is replies.PREGREET
    assert d.conn.send(ev.reply) == b"554 sorry, you talked before my greeting (#5.5.1)\r\n"
    assert d.conn.closed


def test_eof_before_greeting_closes_quietly():
    d = Driver(greet=False)
    d.conn.receive_data(b"")
    assert d.conn.next_event() is CLOSED_EVENT


def test_twenty_errors_close_with_421():
    d = Driver(max_errors=20)
    out = d.feed(b"BOGUS\r\n" * 25).decode().split("\r\n")[:-1]
    assert out[:20] == ["502 unimplemented (#5.5.1)"] * 20
    assert out[20:] == ["421 sorry, too many errors, closing connection (#4.7.0)"]
    assert d.conn.closed


def test_temporary_refusals_do_not_count_as_errors():
    d = Driver(max_errors=3, max_recipients=1)
    d.feed(b"HELO c\r\nMAIL FROM:<a@b.example>\r\n" + b"RCPT TO:<a@test.com>\r\n" * 10)
    assert d.codes().count(452) == 9 and not d.conn.closed


def test_421_from_the_adapter_closes():
    d = Driver(rcpt=lambda ev: replies.TOO_MANY_CONNECTIONS)
    d.feed(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<a@test.com>\r\nNOOP\r\n")
    assert d.codes()[-1] == 421 and d.conn.closed


def test_close_with_for_timeout():
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.conn.close_with(replies.TIMEOUT) == b"451 4.4.2 timeout (#4.4.2)\r\n"
    assert d.conn.closed


def test_eof_after_complete_commands_processes_them_then_closes():
    d = Driver()
    d.conn.receive_data(b"NOOP\r\nNOOP")
    d.conn.receive_data(b"")
    assert d.pump() is CLOSED_EVENT
    assert d.out.endswith(b"250 ok\r\n") and d.codes().count(250) == 1
    assert d.conn.closed


# --- DATA -------------------------------------------------------------------------------------

def open_data(**kw) -> Driver:
    d = Driver(**kw)
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<a@test.com>\r\nDATA\r\n")
    assert d.codes()[-1] == 354
    return d


@pytest.mark.parametrize("wire, stored", [
    (b".\r\n", b""),
    (b"a\r\n.\r\n", b"a\n"),
    (b"\r\n.\r\n", b"\n"),
    (b"..\r\n.\r\n", b".\n"),
    (b"...\r\n.\r\n", b"..\n"),
    (b".a\r\n.\r\n", b"a\n"),                   # RFC 5321 4.5.2: drop the first dot
    (b"a\r\n..b\r\n.\r\n", b"a\n.b\n"),
    (b"a\r\n. \r\n.\r\n", b"a\n \n"),
    (b"a.\r\n.\r\n", b"a.\n"),
    (b"x\r\n\r\n.\r\n", b"x\n\n"),
    (b"\xff\x80 8bit\r\n.\r\n", b"\xff\x80 8bit\n"),
])
def test_data_is_unstuffed_with_lf_line_ends(wire, stored):
    d = open_data()
    d.feed(wire)
    assert b"".join(d.chunks) == stored
    assert d.codes()[-1] == 250


def test_data_byte_by_byte_gives_the_same_message():
    wire = b"Subject: x\r\n\r\n.leading\r\n..two\r\nend.\r\n\r\n.\r\nNOOP\r\n"
    d = open_data()
    for i in range(len(wire)):
        d.feed(wire[i:i + 1])
    assert b"".join(d.chunks) == b"Subject: x\n\nleading\n.two\nend.\n\n"
    assert d.codes()[-2:] == [250, 250]


@pytest.mark.parametrize("wire, reply", [
    (b"a\nb\r\n.\r\n", "451 4.6.0 See http://pobox.com/~djb/docs/smtplf.html."),
    (b"a\r\n.\n", "451 4.6.0 See http://pobox.com/~djb/docs/smtplf.html."),
    (b"a\n.\r\nMAIL FROM:<evil@x.example>\r\n",
     "451 4.6.0 See http://pobox.com/~djb/docs/smtplf.html."),
    (b"a\r.\r\n", "451 4.6.0 sorry, bare CR in message; lines end in CRLF (#4.6.0)"),
    (b"a\r\n.\rMAIL FROM:<x@y.example>\r\n",
     "451 4.6.0 sorry, bare CR in message; lines end in CRLF (#4.6.0)"),
    # As many CRs as LFs, none of them paired (the counts alone would balance).
    (b"a\rb\nc\r\n.\r\n", "451 4.6.0 See http://pobox.com/~djb/docs/smtplf.html."),
    (b"a\n\rb\r\n.\r\n", "451 4.6.0 See http://pobox.com/~djb/docs/smtplf.html."),
    # A CR doubled before its LF: one pair and one bare CR.
    (b"a\r\r\nb\r\n.\r\n", "451 4.6.0 sorry, bare CR in message; lines end in CRLF (#4.6.0)"),
])
def test_bare_lf_or_cr_in_data_never_ends_the_message_and_closes(wire, reply):
    """SMTP smuggling: <LF>.<CR><LF> or <CR>.<CR> must not end the message; qmail answers a bare
    LF with 451 and hangs up, and we treat a bare CR the same."""
    d = open_data()
    seen = len(d.events)
    d.feed(wire)
    assert d.lines()[-1] == reply
    assert d.conn.closed
    assert d.ends[-1].reply is not None            # the adapter aborts, never commits
    assert [type(e) for e in d.events[seen:]] == [MessageEnd]   # nothing read after it


def test_databytes_overflow_reads_to_the_final_dot_then_552():
    d = open_data(databytes=100)
    for _ in range(10):
        d.feed(b"y" * 50 + b"\r\n")
    assert d.codes()[-1] == 354                   # still reading
    d.feed(b".\r\nNOOP\r\n")
    assert d.lines()[-2:] == [
        "552 5.3.4 sorry, that message size exceeds my databytes limit (#5.3.4)", "250 2.0.0 ok"]
    assert sum(map(len, d.chunks)) <= 100
    assert d.ends[0].reply is replies.SIZE_EXCEEDED
    assert not d.conn.closed


def test_message_of_exactly_databytes_is_accepted():
    d = open_data(databytes=6)
    d.feed(b"12345\r\n.\r\n")
    assert d.codes()[-1] == 250


def test_data_lines_of_any_length_stream_and_never_desynchronise():
    d = open_data(databytes=50_000_000)
    piece = b"z" * 65536
    for _ in range(80):                            # a 5 MiB line
        d.feed(piece)
        assert d.conn.buffered <= 2
    d.feed(b"\r\n.\r\nNOOP\r\n")
    assert sum(map(len, d.chunks)) == 80 * 65536 + 1
    assert max(map(len, d.chunks)) <= 65536
    assert d.codes()[-2:] == [250, 250]


def test_long_command_line_inside_data_is_just_data():
    d = open_data()
    d.feed(b"MAIL FROM:<" + b"x" * 2000 + b"@y>\r\n.\r\n")
    assert d.codes()[-1] == 250 and len(b"".join(d.chunks)) == 2015


def test_eof_in_data_closes_without_message_end():
    d = open_data()
    d.feed(b"partial\r\n")
    d.conn.receive_data(b"")
    assert d.pump() is CLOSED_EVENT
    assert d.ends == []


def test_adapter_may_refuse_data():
    d = Driver()
    d.feed(b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<a@test.com>\r\n")
    d.conn.receive_data(b"DATA\r\nNOOP\r\n")
    ev = d.conn.next_event()
    assert isinstance(ev, DataStart)
    d.out += d.conn.send(replies.QQ_TEMPORARY)
    d.pump()
    assert d.codes()[-2:] == [451, 250]           # NOOP read as a command, not as data


# --- STARTTLS and AUTH seams -------------------------------------------------------------------

def test_starttls_discards_pipelined_input_and_resets_the_session():
    d = Driver(starttls_offered=True)
    d.feed(b"EHLO c\r\n")
    d.conn.receive_data(b"STARTTLS\r\nRSET\r\nMAIL FROM:<inject@x.example>\r\n")
    ev = d.conn.next_event()
    assert isinstance(ev, StartTLS)
    assert d.conn.send(ev.reply) == b"220 2.0.0 ready to start TLS\r\n"
    assert d.conn.buffered == 0
    assert d.conn.next_event() is NEED_DATA
    assert d.conn.tls and d.conn.helo is None and not d.conn.extended
    out = d.feed(b"EHLO c\r\n").decode()
    assert "STARTTLS" not in out
    assert d.feed(b"STARTTLS\r\n") == b"503 5.5.1 sorry, TLS is already active (#5.5.1)\r\n"


def test_starttls_refused_by_adapter_keeps_the_session():
    d = Driver(starttls_offered=True)
    d.conn.receive_data(b"STARTTLS\r\nNOOP\r\n")
    ev = d.conn.next_event()
    d.out += d.conn.send(replies.TLS_UNAVAILABLE)
    d.pump()
    assert d.codes()[-2:] == [454, 250] and not d.conn.tls


def test_auth_exchange_states():
    d = Driver(auth_mechanisms=("PLAIN", "LOGIN"))
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH CRAM-MD5\r\n") == b"504 5.5.4 auth type unimplemented (#5.5.1)\r\n"
    d.conn.receive_data(b"AUTH LOGIN\r\n")
    ev = d.conn.next_event()
    assert isinstance(ev, Auth) and ev.mechanism == "LOGIN" and ev.initial is None
    d.conn.send(replies.Reply(334, None, "VXNlcm5hbWU6"))
    d.conn.receive_data(b"dXNlcg==\r\n")
    ev = d.conn.next_event()
    assert isinstance(ev, AuthResponse) and ev.line == "dXNlcg=="
    d.conn.send(replies.Reply(334, None, "UGFzc3dvcmQ6"))
    d.conn.receive_data(b"*\r\n")
    ev = d.conn.next_event()
    assert ev.reply is replies.AUTH_CANCELLED
    d.conn.send(ev.reply)
    d.conn.receive_data(b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n")
    ev = d.conn.next_event()
    assert ev.initial == "AHVzZXIAcGFzcw=="
    d.conn.send(replies.AUTH_OK)
    assert d.conn.authenticated
    assert d.feed(b"AUTH PLAIN x\r\n") == b"503 5.5.1 you're already authenticated (#5.5.0)\r\n"
    assert d.feed(b"MAIL FROM:<a@b.example> AUTH=<>\r\n") == b"250 2.1.0 ok\r\n"


def test_auth_not_inside_a_transaction():
    d = Driver(auth_mechanisms=("PLAIN",))
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"AUTH PLAIN x\r\n").startswith(b"503 5.5.1 sorry, no AUTH during")


# --- Received: header -------------------------------------------------------------------------

def test_received_header_is_qmail_style_and_sanitises_helo():
    h = received_header(helo="evil\x01name (x)\tinjected", client_ip="127.0.0.5",
                        hostname=HOST, when=0)
    assert h == (b"Received: from unknown (HELO evil?name??x??injected) (127.0.0.5)\n"
                 b"  by mx.test.com with ESMTP; Thu, 01 Jan 1970 00:00:00 -0000\n")
    assert received_header(helo=None, client_ip="::1", hostname=HOST, when=0,
                           protocol="ESMTPA").startswith(b"Received: from unknown (::1)\n")
    long = received_header(helo="h" * 900, client_ip="1.2.3.4", hostname=HOST, when=0)
    assert max(map(len, long.split(b"\n"))) < 300


def test_every_event_that_wants_a_reply_is_answered_exactly_once():
    """The reply count equals the command count for a long mixed session (HELO mode)."""
    cmds = [b"HELO c", b"NOOP", b"MAIL FROM:<a@b.example>", b"RCPT TO:<x@test.com>", b"RSET",
            b"VRFY x", b"BOGUS", b"HELP", b"MAIL FROM:bad", b"EXPN y"] * 5
    d = session(b"".join(c + b"\r\n" for c in cmds), max_errors=100)
    assert len(d.codes()) == 1 + len(cmds)
    assert all(re.fullmatch(r"\d{3}[ -].*", line) for line in d.lines())


# --- mail loops (qmail's MAXHOPS) -------------------------------------------------------------

def hop_message(received: int, delivered: int = 0) -> bytes:
    lines = [b"Received: from hop%d by x; date" % i for i in range(received)]
    lines += [b"DELIVERED-TO: loop@test.com"] * delivered
    return b"\r\n".join(lines + [b"Subject: loop", b"", b"Received: in the body, not counted"]) \
        + b"\r\n.\r\n"


@pytest.mark.parametrize("received, delivered, code", [
    (100, 0, 250), (101, 0, 554), (60, 41, 554), (60, 40, 250), (0, 0, 250)])
def test_too_many_hops_is_554_after_the_dot(received, delivered, code):
    d = open_data()
    d.feed(hop_message(received, delivered))
    assert d.codes()[-1] == code
    if code == 554:
        assert d.lines()[-1] == "554 5.4.6 too many hops, this message is looping (#5.4.6)"


def test_hop_count_is_independent_of_splitting():
    wire = hop_message(101)
    for step in (1, 7, 64):
        d = open_data()
        for i in range(0, len(wire), step):
            d.feed(wire[i:i + step])
        assert d.codes()[-1] == 554, step


def test_received_lines_in_the_body_do_not_count():
    d = open_data()
    d.feed(b"Subject: x\r\n\r\n" + b"Received: quoted in the body\r\n" * 150 + b".\r\n")
    assert d.codes()[-1] == 250
