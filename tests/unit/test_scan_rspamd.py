"""rspamd's /checkv2 request and reply parsing (mailappliance/scan/rspamd.py), no sockets."""

from __future__ import annotations

import json

from hypothesis import given, strategies as st

from mailappliance.scan import rspamd
from mailappliance.scan.interfaces import ScanEnvelope, ScanFailure, SpamReport
from mailappliance.scan.rspamd import (
    ResponseReader, check_request, parse_check_reply, parse_ping_reply)


def head_lines(req: bytes) -> list[str]:
    assert req.endswith(b"\r\n\r\n")
    return req[:-4].decode("ascii").split("\r\n")


def test_request_names_the_envelope_in_headers():
    env = ScanEnvelope("192.0.2.7", "mail.example.org", "a@example.org",
                       ("b@test.com", "c@test.com"), "bob@test.com", "mx.test")
    lines = head_lines(check_request(1234, env))
    assert lines[0] == "POST /checkv2 HTTP/1.1"
    for expected in ("Content-Length: 1234", "Connection: close", "IP: 192.0.2.7",
                     "Helo: mail.example.org", "From: <a@example.org>", "Rcpt: <b@test.com>",
                     "Rcpt: <c@test.com>", "User: bob@test.com", "MTA-Name: mx.test"):
        assert expected in lines


def test_null_sender_and_missing_fields():
    lines = head_lines(check_request(0, ScanEnvelope()))
    assert "From: <>" in lines
    assert not any(line.startswith(("IP:", "Helo:", "User:", "Rcpt:")) for line in lines)


@given(st.text(max_size=600))
def test_no_envelope_text_can_split_the_request(helo):
    req = check_request(5, ScanEnvelope("1.2.3.4", helo, "a@b", ("c@d",)))
    lines = head_lines(req)
    assert len(lines) == (8 if helo else 7)
    assert all(len(line) <= rspamd.MAX_HEADER_VALUE + 10 for line in lines)


def test_recipient_headers_are_bounded():
    env = ScanEnvelope(recipients=tuple(f"u{i}@test.com" for i in range(500)))
    assert sum(line.startswith("Rcpt:") for line in head_lines(check_request(1, env))) == \
        rspamd.MAX_RCPT_HEADERS


OK_BODY = json.dumps({"is_skipped": False, "score": 20.0, "required_score": 15.0,
                      "action": "reject",
                      "symbols": {"ZED": {"score": 1}, "MAILAPPLIANCE_TEST_SPAM": {}}}).encode()


def response(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\nServer: rspamd/3.4\r\n{extra}"
            f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n\r\n"
            ).encode() + body


def test_response_in_pieces_completes_at_its_content_length():
    data = response(OK_BODY)
    r = ResponseReader()
    for i in range(len(data) - 1):
        assert r.feed(data[i:i + 1]) is None
    assert r.feed(data[-1:]) == (200, OK_BODY)


def test_response_without_length_ends_at_close():
    r = ResponseReader()
    assert r.feed(b"HTTP/1.0 200 OK\r\n\r\npong\r\n") is None
    assert r.eof() == (200, b"pong\r\n")


def test_truncated_and_broken_responses_are_failures():
    r = ResponseReader()
    r.feed(response(OK_BODY)[:-5])
    assert isinstance(r.eof(), ScanFailure)
    assert isinstance(ResponseReader().eof(), ScanFailure)
    for bad in (b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"):
        assert isinstance(ResponseReader().feed(bad), ScanFailure), bad


def test_response_size_is_bounded():
    r = ResponseReader(max_response=100)
    assert r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n") is None
    got = r.feed(b"x" * (100 + rspamd.MAX_RESPONSE_HEAD))
    assert isinstance(got, ScanFailure)
    assert r.feed(b"more") is got
    endless_head = ResponseReader()
    assert isinstance(endless_head.feed(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 20000), ScanFailure)


def test_check_reply_gives_score_sorted_symbols_and_action():
    assert parse_check_reply(200, OK_BODY) == SpamReport(
        20.0, ("MAILAPPLIANCE_TEST_SPAM", "ZED"), "reject")


def test_check_reply_failures():
    for status, body in ((500, b'{"error": "boom"}'), (200, b"not json"), (200, b"[1, 2]"),
                         (200, b'{"error": "no score"}'), (200, b'{"score": "high"}'),
                         (200, b'{"score": true}'), (200, b'{"score": NaN}'),
                         (200, b'{"score": Infinity}'), (200, b"\xff\xfe")):
        got = parse_check_reply(status, body)
        assert isinstance(got, ScanFailure) and got.outage, (status, body)


def test_symbol_names_are_cleaned_and_bounded():
    body = json.dumps({"score": 1, "symbols": {f"S{i:03d}\r\nX": {} for i in range(80)}})
    got = parse_check_reply(200, body.encode())
    assert len(got.symbols) == rspamd.MAX_SYMBOLS
    assert all("\r" not in s and "\n" not in s for s in got.symbols)


def test_ping_reply():
    assert parse_ping_reply(200, b"pong\r\n") is None
    assert isinstance(parse_ping_reply(404, b"pong"), ScanFailure)
    assert isinstance(parse_ping_reply(200, b"<html>"), ScanFailure)


@given(st.binary(max_size=400), st.integers(1, 50))
def test_any_reply_bytes_in_any_pieces_give_a_result_never_an_exception(data, step):
    r = ResponseReader(max_response=200)
    got = None
    for i in range(0, len(data), step):
        got = r.feed(data[i:i + step])
        if got is not None:
            break
    if got is None:
        got = r.eof()
    if not isinstance(got, ScanFailure):
        status, body = got
        assert isinstance(parse_check_reply(status, body), (SpamReport, ScanFailure))


def test_real_shaped_reply_split_anywhere():
    data = response(OK_BODY)
    for cut in range(len(data)):
        r = ResponseReader()
        first = r.feed(data[:cut])
        assert first is None
        assert r.feed(data[cut:]) == (200, OK_BODY)
