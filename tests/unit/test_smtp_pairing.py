"""Our SMTP client core (smtp/client.py, qmail-remote's side) paired with our SMTP server core
(smtp/core.py, qmail-smtpd's side) in memory, as h11 tests its client against its server: every
byte one core writes is fed to the other's receive_data, with no sockets, reactor or clock.

The server's policy (which recipients exist, what MAIL, DATA and the end of the message get) is
the tiny `Policy` below, standing where smtp/protocol.py's relay decision and queue commit stand.
Each test asserts what actually crossed: the exact message bytes the server core handed out (in
its stored form: LF line ends, dot-stuffing removed), and the client's result per recipient in
qmail-remote's words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings, strategies as st

from mailappliance.smtp import replies
from mailappliance.smtp.client import (ClientCore, Close, DataEncoder, Send, SendBody,
                                       StartTLS)
from mailappliance.smtp.core import (CLOSED_EVENT, NEED_DATA, PAUSED, DataChunk, DataStart,
                                     Handled, Hello, MailFrom, MessageEnd, RcptTo,
                                     ServerConnection)
from mailappliance.smtp.replies import Reply

HOST = "mx.test.com"
PEER = "192.0.2.25"                  # how the client's reports name the server
SENDER = "sender@client.example"
LOCAL = ("alice@test.com", "bob@test.com")
QUEUED = replies.queued(0, "1")      # "250 ok 0 qp 1": what the server says after the commit
SUCCESS, DEFERRAL, FAILURE = "success", "deferral", "failure"


@dataclass
class Policy:
    """The server's decisions, as smtp/protocol.py makes them (None: the core's own reply)."""

    mailboxes: tuple[str, ...] = LOCAL
    pipelining: bool = True          # False: EHLO answered without PIPELINING
    mail: Reply | None = None
    rcpt: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None
    end: Reply | None = None

    def answer(self, conn: ServerConnection, ev) -> Reply:
        t = type(ev)
        if t is Hello and ev.extended and not self.pipelining:
            words = [w for w in conn.ehlo_keywords() if w != "PIPELINING"]
            return replies.ehlo(HOST, words)
        if t is MailFrom:
            return self.mail or ev.reply
        if t is RcptTo:
            rcpt = str(ev.recipient)
            if rcpt in self.rcpt:
                return self.rcpt[rcpt]
            return replies.RCPT_OK if rcpt in self.mailboxes else replies.NO_MAILBOX
        if t is DataStart:
            return self.data or ev.reply
        if t is MessageEnd:
            return ev.reply or self.end or QUEUED
        return ev.reply


class Pair:
    """One client core and one server core joined by two in-memory byte streams."""

    def __init__(self, message: list[bytes] | bytes, recipients=LOCAL, policy=None, *,
                 size=None, segment=None, databytes=1_000_000, max_recipients=100,
                 greeting=replies.greeting(HOST)):
        self.greeting = greeting
        self.chunks = [message] if isinstance(message, bytes) else list(message)
        self.policy = policy or Policy()
        self.segment = segment            # re-cut client bytes into TCP segments of this size
        self.server = ServerConnection(HOST, databytes=databytes, max_recipients=max_recipients)
        total = sum(len(c) for c in self.chunks)
        self.client = ClientCore(helo="client.example", sender=SENDER,
                                 recipients=list(recipients),
                                 size=total if size is None else size, host=PEER)
        self.c2s: list[bytes] = []        # each write of the client, as written
        self.s2c: list[bytes] = []        # each write of the server, as written
        self.events: list[tuple[str, int]] = []     # (server event, reply code)
        self.delivered: list[tuple[str, tuple[str, ...], bytes]] = []
        self._pieces: list[bytes] = []
        self._to_server: list[bytes] = []
        self._to_client: list[bytes] = []
        self._client_hung_up = False
        self._eof_sent = False
        self._lost_told = False

    # -- the two ends ----------------------------------------------------------------------------
    def _client_acts(self, actions) -> None:
        for a in actions:
            if isinstance(a, Send):
                self._client_writes(a.data)
            elif isinstance(a, SendBody):
                enc = DataEncoder()                 # as delivery/remote.py streams the body
                for chunk in self.chunks:
                    self._client_writes(enc.encode(chunk))
                self._client_writes(enc.finish())
                self.client.body_done()
            elif isinstance(a, Close):
                self._client_hung_up = True
            else:
                raise AssertionError(f"unexpected client action {a!r}")   # StartTLS: not offered

    def _client_writes(self, data: bytes) -> None:
        if data and not self._client_hung_up:
            self.c2s.append(data)
            self._to_server.append(data)

    def _serve(self) -> None:
        conn = self.server
        out = b""
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is CLOSED_EVENT:
                break
            assert ev is not PAUSED          # every event is answered at once here
            if type(ev) is DataChunk:
                self._pieces.append(ev.data)
                continue
            reply = self.policy.answer(conn, ev)
            if type(ev) is MessageEnd:
                body, self._pieces = b"".join(self._pieces), []
                if reply.code // 100 == 2:
                    self.delivered.append((ev.sender, ev.recipients, body))
            name = type(ev).__name__
            if type(ev) is Handled:
                name = f"{ev.verb} (core)"    # a line the core answered itself
            self.events.append((name, reply.code))
            out += conn.send(reply)
            if conn.closed:
                break
        if out:
            self.s2c.append(out)
            self._to_client.append(out)

    # -- the wire --------------------------------------------------------------------------------
    def run(self) -> "Pair":
        out = self.server.send(self.greeting)
        self.s2c.append(out)
        self._to_client.append(out)
        while True:
            if self._to_client:
                data = self._to_client.pop(0)
                if not self.client.done:
                    self._client_acts(self.client.receive_data(data))
            elif self._to_server:
                data = self._to_server.pop(0)
                if self.server.closed:
                    continue                   # the server has hung up: nobody reads these
                step = self.segment or len(data)
                for i in range(0, len(data), step):
                    self.server.receive_data(data[i:i + step])
                    self._serve()
            elif self._client_hung_up and not self._eof_sent:
                self._eof_sent = True          # the client's FIN, after everything it wrote
                if not self.server.closed:
                    self.server.receive_data(b"")
                    self._serve()
            elif self.server.closed and not self._lost_told:
                self._lost_told = True         # the server's FIN, after everything it wrote
                self.client.connection_lost()
            else:
                break
        return self

    # -- what came of it -------------------------------------------------------------------------
    @property
    def results(self) -> list[tuple[str, str]]:
        return [(r.status, r.text) for r in self.client.results]

    def count(self, name: str) -> int:
        return sum(1 for ev, _ in self.events if ev == name)


def said(reply: Reply) -> str:
    """How the client quotes a one-line reply of ours after EHLO (enhanced code included)."""
    return f"{reply.code} {reply.enhanced} {reply.text}"


def stored_form(message: bytes) -> bytes:
    """What the server must hand out for a message: CRLF, bare CR and bare LF each end a line
    (the client's normalisation), lines end in LF, and the last line is ended."""
    text = re.sub(rb"\r\n|\r|\n", b"\n", message)
    return text + b"\n" if text and not text.endswith(b"\n") else text


MESSAGE = b"From: sender@client.example\nSubject: hi\n\nHello,\n.hidden dot\n..two dots\nbye\n"
ACCEPTED = f"{PEER} accepted message.\nRemote host said: {said(QUEUED)}"


# --- the conversation -----------------------------------------------------------------------------

def test_pipelined_transaction_goes_in_one_write_and_the_message_arrives_intact():
    p = Pair(MESSAGE).run()
    size = len(MESSAGE)
    assert p.c2s[1] == (f"MAIL FROM:<{SENDER}> SIZE={size} BODY=8BITMIME\r\n"
                        "RCPT TO:<alice@test.com>\r\nRCPT TO:<bob@test.com>\r\nDATA\r\n").encode()
    # The server answered the four pipelined commands in order, in one write.
    assert p.s2c[2] == (b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    assert p.delivered == [(SENDER, LOCAL, MESSAGE)]
    assert p.results == [(SUCCESS, ACCEPTED)] * 2
    assert p.c2s[-1] == b"QUIT\r\n" and p.server.closed and p.client.done
    assert p.events == [("Hello", 250), ("MailFrom", 250), ("RcptTo", 250), ("RcptTo", 250),
                        ("DataStart", 354), ("MessageEnd", 250), ("Quit", 221)]


def test_without_pipelining_the_client_waits_for_each_reply():
    p = Pair(MESSAGE, policy=Policy(pipelining=False)).run()
    assert p.c2s[1:5] == [f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)} BODY=8BITMIME\r\n".encode(),
                          b"RCPT TO:<alice@test.com>\r\n", b"RCPT TO:<bob@test.com>\r\n",
                          b"DATA\r\n"]
    assert p.delivered == [(SENDER, LOCAL, MESSAGE)]
    assert p.results == [(SUCCESS, ACCEPTED)] * 2


def test_null_sender_and_a_single_recipient():
    p = Pair(MESSAGE, ["alice@test.com"])
    p.client.sender = ""                    # a bounce: MAIL FROM:<>
    p.run()
    assert p.c2s[1].startswith(b"MAIL FROM:<> SIZE=")
    assert p.delivered == [("", ("alice@test.com",), MESSAGE)]
    assert p.results == [(SUCCESS, ACCEPTED)]


# --- errors ---------------------------------------------------------------------------------------

def test_refused_recipient_fails_alone_and_the_others_get_the_message():
    p = Pair(MESSAGE, ["alice@test.com", "nobody@test.com", "bob@test.com"]).run()
    assert p.delivered == [(SENDER, LOCAL, MESSAGE)]
    assert p.results == [
        (SUCCESS, ACCEPTED),
        (FAILURE, f"{PEER} does not like recipient.\nRemote host said: {said(replies.NO_MAILBOX)}"),
        (SUCCESS, ACCEPTED)]


def test_recipient_over_the_servers_limit_is_deferred_not_failed():
    # The server core's own limit (RFC 5321 4.5.3.1.10): 452 for the second recipient.
    p = Pair(MESSAGE, max_recipients=1).run()
    assert p.delivered == [(SENDER, ("alice@test.com",), MESSAGE)]
    assert p.results == [
        (SUCCESS, ACCEPTED),
        (DEFERRAL,
         f"{PEER} does not like recipient.\nRemote host said: "
         f"{said(replies.TOO_MANY_RECIPIENTS)}")]


def test_no_recipient_accepted_sends_no_message():
    policy = Policy(mailboxes=())
    p = Pair(MESSAGE, policy=policy).run()
    assert p.delivered == [] and p.count("MessageEnd") == 0
    no_like = f"{PEER} does not like recipient.\nRemote host said: {said(replies.NO_MAILBOX)}"
    assert p.results == [(FAILURE, no_like)] * 2
    # The pipelined DATA was refused by the server core itself (no valid recipients).
    assert p.events[-2:] == [("DATA (core)", 503), ("Quit", 221)]


@pytest.mark.parametrize("reply, status", [
    (replies.SENDER_LOOKUP_FAILED, DEFERRAL),                   # 451 at MAIL
    (replies.AUTH_REQUIRED, FAILURE),                            # 530 at MAIL
    (replies.sender_not_yours("x@test.com"), FAILURE),           # 553 at MAIL
])
@pytest.mark.parametrize("pipelining", [True, False])
def test_sender_refused_at_mail(reply, status, pipelining):
    p = Pair(MESSAGE, policy=Policy(mail=reply, pipelining=pipelining)).run()
    assert p.delivered == []
    text = f"Connected to {PEER} but sender was rejected.\nRemote host said: {said(reply)}"
    assert p.results == [(status, text)] * 2
    assert not p.client.try_next_host
    if pipelining:
        # The pipelined RCPTs and DATA reached the server, which refused them in sequence.
        assert p.events == [("Hello", 250), ("MailFrom", reply.code), ("RCPT (core)", 503),
                            ("RCPT (core)", 503), ("DATA (core)", 503), ("Quit", 221)]
    else:
        assert p.events == [("Hello", 250), ("MailFrom", reply.code), ("Quit", 221)]


@pytest.mark.parametrize("reply, status", [
    (replies.QQ_TEMPORARY, DEFERRAL), (Reply(554, "5.3.0", "no DATA today"), FAILURE)])
def test_data_refused_and_the_body_is_never_sent_as_commands(reply, status):
    p = Pair(MESSAGE, policy=Policy(data=reply)).run()
    assert p.delivered == []
    text = f"{PEER} failed on DATA command.\nRemote host said: {said(reply)}"
    assert p.results == [(status, text)] * 2
    # After the refused DATA only QUIT reached the server: not one line of the message.
    assert p.events[-2:] == [("DataStart", reply.code), ("Quit", 221)]
    assert b"Subject" not in b"".join(p.c2s)


@pytest.mark.parametrize("reply, status", [
    (replies.QQ_WRITE_ERROR, DEFERRAL), (replies.TOO_MANY_HOPS, FAILURE)])
def test_refusal_after_the_final_dot(reply, status):
    p = Pair(MESSAGE, policy=Policy(end=reply)).run()
    assert p.delivered == []
    text = f"{PEER} failed after I sent the message.\nRemote host said: {said(reply)}"
    assert p.results == [(status, text)] * 2


def test_message_over_the_servers_size_is_refused_by_the_client_before_mail():
    p = Pair(MESSAGE, databytes=len(MESSAGE) - 1).run()
    assert p.count("MailFrom") == 0 and p.delivered == []
    text = (f"Connected to {PEER} but the message exceeds its size limit of"
            f" {len(MESSAGE) - 1} bytes. (#5.3.4)")
    assert p.results == [(FAILURE, text)] * 2


def test_size_understated_by_the_caller_is_caught_by_the_server_at_the_final_dot():
    # The server keeps reading to the dot, then 552 (RFC 1870; aiosmtpd's TOO_MUCH).
    p = Pair(MESSAGE, size=10, databytes=len(MESSAGE) - 1).run()
    assert p.delivered == []
    text = f"{PEER} failed after I sent the message.\nRemote host said: " \
           f"{said(replies.SIZE_EXCEEDED)}"
    assert p.results == [(FAILURE, text)] * 2
    assert p.events[-2:] == [("MessageEnd", 552), ("Quit", 221)]


# --- the server closes ----------------------------------------------------------------------------

def test_server_refuses_at_greeting_and_closes():
    # A greeting of 421 (tcpserver's connection limit) closes the server core at once; the
    # client's QUIT finds nobody.
    p = Pair(MESSAGE, greeting=replies.TOO_MANY_CONNECTIONS).run()
    assert p.s2c == [replies.TOO_MANY_CONNECTIONS.render()] and p.c2s == [b"QUIT\r\n"]
    assert p.delivered == [] and p.events == []
    text = (f"Connected to {PEER} but greeting failed.\nRemote host said: "
            f"421 {replies.TOO_MANY_CONNECTIONS.text}")
    assert p.results == [(DEFERRAL, text)] * 2
    assert p.client.try_next_host                 # another MX may do better


def test_server_shutting_down_mid_transaction_closes_and_the_rest_is_deferred():
    # A 421 to the first RCPT (the server stops: drain.py) closes the session; the server core
    # drops what was pipelined behind it.
    p = Pair(MESSAGE, policy=Policy(rcpt={"alice@test.com": replies.SHUTTING_DOWN})).run()
    assert p.delivered == [] and p.server.closed
    assert p.events == [("Hello", 250), ("MailFrom", 250), ("RcptTo", 421)]
    assert p.results == [
        (DEFERRAL, f"{PEER} does not like recipient.\nRemote host said: "
                   f"{said(replies.SHUTTING_DOWN)}"),
        (DEFERRAL, f"Connected to {PEER} but connection died. (#4.4.2)")]
    assert not p.client.try_next_host


def test_server_closing_instead_of_the_final_reply_defers_everyone():
    p = Pair(MESSAGE, policy=Policy(end=replies.SHUTTING_DOWN)).run()
    assert p.delivered == [] and p.server.closed
    text = f"{PEER} failed after I sent the message.\nRemote host said: " \
           f"{said(replies.SHUTTING_DOWN)}"
    assert p.results == [(DEFERRAL, text)] * 2


# --- smuggling: no stored byte ends DATA early or starts a second transaction -----------------

SMUGGLERS = [
    # SMTP smuggling (CVE-2023-51764/-51765/-51766 class): an "end of data" in another line-end
    # convention followed by a second transaction, hoping one side reads it as the end.
    b"Subject: a\n\nfirst\n.\nMAIL FROM:<evil@attacker.example>\nRCPT TO:<bob@test.com>\n"
    b"DATA\nforged\n.\n",
    b"Subject: b\r\n\r\nfirst\r\n.\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<bob@test.com>"
    b"\r\nDATA\r\nforged\r\n.\r\n",
    b"Subject: c\n\nfirst\r.\rMAIL FROM:<evil@attacker.example>\rRCPT TO:<bob@test.com>\r",
    b"Subject: d\n\nfirst\n.\r\nMAIL FROM:<evil@attacker.example>\r\n",
    b"Subject: e\n\nfirst\r\n.\nMAIL FROM:<evil@attacker.example>\n",
    b"Subject: f\n\nfirst\r\n.\r.\n.\r\r\n",
    b".\n..\n...\n.\r\n.",                       # dots at line starts, and a last line of "."
    b"no line end at all",
    b"",                                          # an empty message
]


@pytest.mark.parametrize("message", SMUGGLERS)
def test_smuggled_end_of_data_never_ends_the_message(message):
    p = Pair(message, ["alice@test.com"]).run()
    assert p.delivered == [(SENDER, ("alice@test.com",), stored_form(message))]
    assert p.count("MailFrom") == 1 and p.count("MessageEnd") == 1
    assert p.results == [(SUCCESS, ACCEPTED)]


@pytest.mark.parametrize("message", SMUGGLERS[:4])
def test_smuggling_across_every_chunk_boundary(message):
    """The client's body chunks and the server's TCP segments split anywhere, a CR from its LF
    included."""
    for cut in range(len(message) + 1):
        for segment in (1, 3, None):
            p = Pair([message[:cut], message[cut:]], ["alice@test.com"], segment=segment).run()
            assert p.delivered == [(SENDER, ("alice@test.com",), stored_form(message))], \
                (cut, segment)
            assert p.count("MailFrom") == 1


def test_a_message_in_lf_form_arrives_byte_for_byte():
    """What the queue stores (LF line ends, any dots) is exactly what the server hands out."""
    message = b"Subject: x\n\n.\n..\n.x\nend .\n.\n"
    p = Pair(message, ["alice@test.com"]).run()
    assert p.delivered[0][2] == message


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b" ", b"."]),
                       max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=5),
       segment=st.sampled_from([None, 1, 2, 5]))
def test_any_message_any_chunking_arrives_whole_and_alone(pieces, cuts, segment):
    message = b"".join(pieces)
    bounds = sorted({min(c, len(message)) for c in cuts})
    chunks, start = [], 0
    for b in bounds:
        chunks.append(message[start:b])
        start = b
    chunks.append(message[start:])
    p = Pair(chunks, ["alice@test.com"], segment=segment).run()
    assert p.delivered == [(SENDER, ("alice@test.com",), stored_form(message))]
    assert p.count("MailFrom") == 1 and p.count("MessageEnd") == 1
    # The server never had to defend itself (bare CR/LF 451): our client sends clean DATA.
    assert all(code != 451 for _, code in p.events)
    assert p.results == [(SUCCESS, ACCEPTED)]
