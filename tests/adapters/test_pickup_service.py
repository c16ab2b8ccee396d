"""pickup/service.py: the inject socket's server side on Twisted's doubles -- the message
streams into the real queue with the caller's uid and name in Received:, and every bound
(databytes, connections, time, header size) gives its reply."""

from __future__ import annotations

import json

from twisted.internet.testing import StringTransport

from mailappliance.pickup import core, service as pickup_service
from mailappliance.testing.app import build_test_app


def make(tmp_path, **fields):
    fields.setdefault("default_domain", "test.com")
    app = build_test_app(tmp_path / "var", **fields)
    factory = pickup_service.build_factory(app, "inject")
    factory.peer_uid = lambda transport: 0        # root: pwd knows its name on every machine
    return app, factory


def connect(factory):
    proto = factory.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    return proto, t


def request(message: bytes, recipients=("test@test.com",), sender=None, head=None, **kw):
    head = len(message.split(b"\n\n", 1)[0]) + 2 if head is None else head
    req = core.Request(sender, tuple(recipients), kw.get("extract", False), kw.get("fullname"),
                       min(head, len(message)), len(message))
    return core.encode_request(req) + message


def reply(t) -> tuple[int, str]:
    lines = t.value().split(b"\n")
    assert lines[0].startswith(core.MAGIC), lines
    r = core.parse_reply(lines[1])
    return r.code, r.text


def test_a_message_is_queued_with_the_callers_uid_and_name(tmp_path):
    app, factory = make(tmp_path)
    proto, t = connect(factory)
    assert t.value() == core.greeting(app.settings.smtp.databytes)
    msg = b"Subject: hi\nBcc: hidden@test.com\n\nline one\n"
    data = request(msg)
    for i in range(len(data)):                     # one octet at a time
        proto.dataReceived(data[i:i + 1])
    code, text = reply(t)
    assert code == 0 and text.startswith("queued as "), text
    qid = int(text.split()[-1])
    env = app.queue_store.read_envelope(qid)
    assert env.sender == "root@test.com"           # the login name of uid 0, not $USER
    assert [r.address for r in env.recipients] == ["test@test.com"]
    stored = app.queue_store.read_message(env)
    head, body = stored.split(b"\n\n", 1)
    assert head.startswith(b"Received: (mailappliance-sendmail invoked by uid 0 (root) via "
                           b"the inject socket); ")
    assert b"Bcc" not in head and b"Message-ID: <" in head and b"From: root@test.com" in head
    assert body == b"line one\n"
    assert t.disconnecting


def test_bare_cr_never_reaches_the_queue_and_t_extracts_recipients(tmp_path):
    app, factory = make(tmp_path)
    proto, t = connect(factory)
    msg = b"To: a@test.com\r\nCc: b\r\n\r\nx\ry\r\nz\r"
    proto.dataReceived(request(msg, recipients=(), extract=True, sender="cron"))
    code, text = reply(t)
    assert code == 0, text
    env = app.queue_store.read_envelope(int(text.split()[-1]))
    assert env.sender == "cron@test.com"
    assert [r.address for r in env.recipients] == ["a@test.com", "b@test.com"]
    stored = app.queue_store.read_message(env)
    assert b"\r" not in stored and stored.endswith(b"\n\nx\ny\nz\n")


def test_over_databytes_is_refused_before_the_message_is_read(tmp_path):
    from dataclasses import replace
    app, factory = make(tmp_path)
    app.live.settings = replace(app.settings, smtp=replace(app.settings.smtp, databytes=100))
    proto, t = connect(factory)
    proto.dataReceived(request(b"Subject: x\n\n" + b"y" * 200)[:300])
    code, text = reply(t)
    assert code == 65 and "databytes (100)" in text
    assert app.queue_store.list_ids() == []


def test_refusals_of_malformed_requests(tmp_path):
    app, factory = make(tmp_path)
    cases = [
        (b"not json\n", 64, "not a JSON line"),
        (json.dumps({"recipients": "x", "head": 0, "size": 0}).encode() + b"\n", 64,
         "recipients must be a list"),
        (json.dumps({"recipients": [], "head": 5, "size": 1}).encode() + b"\n", 64,
         "0 <= head <= size"),
        (request(b"Subject: x\n\nbody\n", recipients=()), 64, "no recipients"),
        (request(b"Subject: x\n\nbody\n", recipients=("a..b@test.com",)), 64, "bad address"),
        (b"x" * (core.MAX_REQUEST_LINE + 10), 64, "request line longer"),
    ]
    for data, code, text in cases:
        proto, t = connect(factory)
        proto.dataReceived(data)
        got = reply(t)
        assert got[0] == code and text in got[1], (data[:40], got)
    assert app.queue_store.list_ids() == []


def test_one_connection_over_the_limit_is_told_to_retry(tmp_path):
    app, factory = make(tmp_path)
    factory.max_connections = 1
    first, _t1 = connect(factory)
    _second, t2 = connect(factory)
    r = core.parse_greeting(t2.value().split(b"\n")[0])
    assert isinstance(r, core.Refusal) and r.code == 75 and "busy" in r.text
    assert t2.disconnecting


def test_a_client_that_stops_sending_is_cut_off_after_the_request_timeout(tmp_path):
    app, factory = make(tmp_path)
    proto, t = connect(factory)
    proto.dataReceived(request(b"Subject: x\n\nbody that never ends\n")[:-5])
    app.reactor.advance(pickup_service.REQUEST_TIMEOUT - 1)
    assert not t.disconnecting
    app.reactor.advance(1)
    code, text = reply(t)
    assert code == 75 and "not complete within" in text
    proto.connectionLost(None)
    assert app.queue_store.tmp_files() == []


def test_no_peer_credentials_is_a_temporary_refusal(tmp_path):
    app, factory = make(tmp_path)
    factory.peer_uid = lambda transport: None
    proto, t = connect(factory)
    assert core.parse_reply(t.value()).code == 75


def test_graceful_stop_refuses_what_is_not_committed_and_lets_a_commit_finish(tmp_path):
    app, factory = make(tmp_path)
    idle, t_idle = connect(factory)                 # greeted, nothing sent yet
    busy, t_busy = connect(factory)
    busy.dataReceived(request(b"Subject: x\n\nhalf a message that goes on\n")[:-10])
    d = app.drain.start()
    assert core.parse_reply(t_idle.value().split(b"\n")[1]).code == 75
    assert not t_busy.disconnecting                 # in the middle of its message: it may finish
    app.reactor.advance(app.drain.timeout)
    code, text = reply(t_busy)
    assert code == 75 and "stopping" in text        # never acknowledged: the client retries
    for p in (idle, busy):
        p.connectionLost(None)
    assert app.queue_store.list_ids() == [] and d.called
    late, t_late = connect(factory)                 # a connection during the stop
    assert core.parse_reply(t_late.value()).code == 75


def test_a_long_line_is_re_encoded_before_the_sendmail_message_is_signed(tmp_path):
    """Issue 18 (wire): the signature covers the re-encoded bytes the queue keeps, so it
    verifies on what is sent (dkimpy, against the key's own DNS record)."""
    import dkim

    from mailappliance.mailauth import keys
    (tmp_path / "var").mkdir()
    key = keys.generate(tmp_path / "var", "test.com", "mail", "rsa")
    app, factory = make(tmp_path)
    proto, t = connect(factory)
    msg = b"From: root@test.com\nSubject: long\n\n" + b"v" * 70_000 + b"\n"
    proto.dataReceived(request(msg, recipients=("x@remote.example",)))
    code, text = reply(t)
    assert code == 0, text
    stored = app.queue_store.read_message(app.queue_store.read_envelope(int(text.split()[-1])))
    assert max(map(len, stored.splitlines())) <= 998
    assert stored.startswith(b"DKIM-Signature:") and b"quoted-printable" in stored
    wire = stored.replace(b"\n", b"\r\n")
    assert dkim.verify(wire, dnsfunc=lambda name, timeout=5: key.txt_record().encode())
