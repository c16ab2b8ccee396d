"""pickup/core.py: the inject socket's wire format, fed in every split, and its bounds."""

from __future__ import annotations

from hypothesis import given, strategies as st

from mailappliance.pickup import core


def events(conn: core.PickupConnection, data: bytes, cuts: list[int]) -> list:
    out = []
    pos = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        conn.receive_data(data[pos:cut])
        pos = cut
        while (ev := conn.next_event()) is not core.NEED_DATA:
            out.append(ev)
    return out


def wire(message: bytes, head: int, **kw) -> bytes:
    req = core.Request(kw.get("sender"), ("a@test.com",), False, None, head, len(message))
    return core.encode_request(req) + message


@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=8))
def test_any_split_gives_the_same_message_with_no_cr(message, cuts):
    head = len(message) // 3
    evs = events(core.PickupConnection(10_000), wire(message, head), cuts)
    assert isinstance(evs[0], core.Request) and evs[-1] is core.END
    heads = [e.data for e in evs if isinstance(e, core.Head)]
    body = b"".join(e.data for e in evs if isinstance(e, core.Body))
    assert len(heads) == 1
    stored = heads[0] + body
    assert b"\r" not in stored
    expected = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if expected and not expected.endswith(b"\n"):
        expected += b"\n"
    assert stored == expected


def test_size_over_databytes_is_refused_at_the_request_line():
    conn = core.PickupConnection(10)
    conn.receive_data(wire(b"x" * 11, 0)[:-11])
    ev = conn.next_event()
    assert isinstance(ev, core.Refusal) and ev.code == core.EX_DATAERR
    conn.receive_data(b"more")
    assert conn.next_event() is core.NEED_DATA


def test_header_block_over_its_limit_is_refused():
    conn = core.PickupConnection(core.MAX_HEAD * 4)
    conn.receive_data(wire(b"x" * (core.MAX_HEAD + 1), core.MAX_HEAD + 1)[:200])
    ev = conn.next_event()
    assert isinstance(ev, core.Refusal) and ev.code == core.EX_DATAERR


def test_greeting_and_replies_round_trip():
    assert core.parse_greeting(core.greeting(123)) == 123
    busy = core.parse_greeting(core.encode_reply(75, "busy: try\nagain"))
    assert busy == core.Refusal(75, "busy: try again")
    assert core.parse_reply(b"0 queued as 17\n") == core.Refusal(0, "queued as 17")
    for bad in (b"HTTP/1.1 200 OK\n", b"99 what\n"):
        try:
            core.parse_greeting(bad)
        except core.ProtocolError:
            continue
        raise AssertionError(bad)


def test_unix_path_removes_twisteds_escapes():
    assert core.unix_path(r"unix:/run/a\:b/inject.sock:mode=600") == "/run/a:b/inject.sock"
