"""The admin line protocol core: grammar table, secrets, limits, reply framing (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mailappliance.admin import protocol as p


def events(conn: p.AdminConnection) -> list:
    out = []
    while True:
        ev = conn.next_event()
        if ev is p.NEED_DATA:
            return out
        out.append(ev)


def parse(line: str, needs_token: bool = False):
    conn = p.AdminConnection(needs_token)
    conn.receive_data(line.encode() + b"\n")
    [ev] = events(conn)
    return ev


@pytest.mark.parametrize("line,name,args,options", [
    ("help", "help", {}, {}),
    ("stat", "stat", {}, {}),
    ("  STAT  ", "stat", {}, {}),
    ("queue list", "queue list", {}, {}),
    ("queue flush", "queue flush", {}, {}),
    ("queue remove 123", "queue remove", {"ID": ["123"]}, {}),
    ("queue remove 123 --bounce", "queue remove", {"ID": ["123"]}, {"--bounce": True}),
    ("queue remove --bounce 123 456.0a1b2c3d", "queue remove", {"ID": ["123", "456.0a1b2c3d"]},
     {"--bounce": True}),
    ("queue list --json --limit 10 --after 7.0a1b2c3d", "queue list", {},
     {"--json": True, "--limit": 10, "--after": "7.0a1b2c3d"}),
    ("queue show 42", "queue show", {"ID": "42"}, {}),
    ("queue flush", "queue flush", {}, {}),
    ("queue flush @Example.org", "queue flush", {"TARGET": "@Example.org"}, {}),
    ("queue flush 42.0a1b2c3d", "queue flush", {"TARGET": "42.0a1b2c3d"}, {}),
    ("reload", "reload", {}, {}),
    ("domain add test.com", "domain add", {"NAME": "test.com"}, {}),
    ("domain add test.com --postmaster pm", "domain add", {"NAME": "test.com"},
     {"--postmaster": "pm"}),
    ("domain del test.com", "domain del", {"NAME": "test.com"}, {}),
    ("domain list", "domain list", {}, {}),
    ("user del a@test.com", "user del", {"ADDR": "a@test.com"}, {}),
    ("user list", "user list", {}, {}),
    ("user list test.com", "user list", {"DOMAIN": "test.com"}, {}),
    ("alias add a@t.com b@t.com", "alias add", {"ADDR": "a@t.com", "TARGET": ["b@t.com"]}, {}),
    ("alias add a@t.com b@t.com c@x.org", "alias add",
     {"ADDR": "a@t.com", "TARGET": ["b@t.com", "c@x.org"]}, {}),
    ("alias del a@t.com", "alias del", {"ADDR": "a@t.com"}, {}),
    ("alias list", "alias list", {}, {}),
    ("relay list", "relay list", {}, {}),
    ("quit", "quit", {}, {}),
])
def test_every_command_of_the_table_parses(line, name, args, options):
    ev = parse(line)
    assert isinstance(ev, p.Command), ev
    assert (ev.name, dict(ev.args), dict(ev.options)) == (name, args, options)


def test_the_table_covers_design_md_commands_and_help_lists_each_once():
    names = [c.name for c in p.COMMANDS]
    for needed in ("help", "stat", "queue list", "queue flush", "queue remove", "reload",
                   "domain add", "domain del", "domain list", "user add", "user del",
                   "user passwd", "user list", "alias add", "alias del", "alias list",
                   "relay list"):
        assert names.count(needed) == 1
    help_text = p.help_lines()
    assert len(help_text) == len(p.COMMANDS)
    assert any(h.startswith("user add ADDR [--quota BYTES]") and "password on the next line"
               in h for h in help_text)


@pytest.mark.parametrize("line,error", [
    ("bogus", "unknown command 'bogus'; try help"),
    ("queue", "queue: expected one of flush, list, remove, show"),
    ("queue explode", "queue: expected one of flush, list, remove, show"),
    ("queue remove", "queue remove: missing ID; usage: queue remove ID... [--bounce]"),
    ("queue remove abc", "queue remove: ID: a queue id is a number, or number.hex as the log "
                         "shows it"),
    ("queue remove 1 2.xyz", "queue remove: ID: a queue id is a number, or number.hex as the "
                             "log shows it"),
    ("queue remove 1 --force", "queue remove: unknown option '--force'; usage: "
                               "queue remove ID... [--bounce]"),
    ("queue list --limit 0", "queue list: --limit: expected a number from 1 to 10000"),
    ("queue flush @", "queue flush: TARGET: expected @DOMAIN"),
    ("queue show", "queue show: missing ID; usage: queue show ID"),
    ("queue remove 1 --bounce --bounce", "queue remove: option --bounce given twice"),
    ("stat now", "stat: too many arguments; usage: stat [--json]"),
    ("user add", "user add: missing ADDR; usage: user add ADDR [--quota BYTES]"),
    ("user add a@b.c --quota", "user add: option --quota needs a value"),
    ("user add a@b.c --quota -5", "user add: --quota: expected a number of bytes"),
    ("alias add a@b.c", "alias add: missing TARGET; usage: alias add ADDR TARGET..."),
    ("stat\x00", "control characters in command line"),
    ("x" * 50, "unknown command '" + "x" * 40 + "...'; try help"),
    (" ".join(["alias", "add"] + ["a@b.c"] * 200), f"too many words (limit {p.MAX_WORDS})"),
])
def test_malformed_lines_get_one_clear_error(line, error):
    ev = parse(line)
    assert ev == p.Invalid(error)


def test_non_utf8_command_is_refused():
    conn = p.AdminConnection()
    conn.receive_data(b"stat \xff\xfe\n")
    assert events(conn) == [p.Invalid("command line is not UTF-8 text")]


def test_blank_lines_are_ignored_and_crlf_is_accepted():
    conn = p.AdminConnection()
    conn.receive_data(b"\n   \r\nstat\r\nhelp\n")
    assert [e.name for e in events(conn)] == ["stat", "help"]


def test_password_comes_from_the_next_line_and_never_shows_in_repr_or_describe():
    conn = p.AdminConnection()
    conn.receive_data(b"user add a@test.com --quota 1000\n")
    assert events(conn) == []                       # waiting for the secret line
    assert conn.awaiting is not None
    conn.receive_data(b"S3cret pass!\r\nstat\n")
    cmd, stat = events(conn)
    assert cmd.name == "user add" and cmd.secret == "S3cret pass!"
    assert dict(cmd.args) == {"ADDR": "a@test.com"} and cmd.options == {"--quota": 1000}
    assert "S3cret" not in repr(cmd) and "S3cret" not in cmd.describe()
    assert cmd.describe() == "user add a@test.com --quota 1000"
    assert stat.name == "stat"


def test_a_secret_line_is_taken_verbatim_even_if_it_looks_like_a_command():
    conn = p.AdminConnection()
    conn.receive_data(b"user passwd a@test.com\nquit\n")
    [cmd] = events(conn)
    assert cmd.name == "user passwd" and cmd.secret == "quit"
    assert not conn.closed


def test_an_overlong_secret_line_refuses_its_command():
    conn = p.AdminConnection()
    conn.receive_data(b"user add a@test.com\n" + b"x" * (p.MAX_LINE + 1) + b"\nstat\n")
    err, stat = events(conn)
    assert err == p.Invalid(f"line too long (limit {p.MAX_LINE} octets)")
    assert stat.name == "stat" and conn.awaiting is None


def test_line_of_exactly_max_line_is_parsed_and_one_more_octet_is_refused():
    conn = p.AdminConnection()
    conn.receive_data(b"stat" + b" " * (p.MAX_LINE - 4) + b"\n")
    assert [e.name for e in events(conn)] == ["stat"]
    conn.receive_data(b"stat" + b" " * (p.MAX_LINE - 3) + b"\nhelp\n")
    assert events(conn) == [p.Invalid(f"line too long (limit {p.MAX_LINE} octets)")] + \
        [parse("help")]


def test_a_huge_line_without_newline_costs_bounded_memory_and_one_error():
    conn = p.AdminConnection()
    for _ in range(1000):                            # 64 MiB in 64 KiB pieces
        conn.receive_data(b"y" * 65536)
        assert conn.buffered() <= p.MAX_LINE
    conn.receive_data(b"yyy\nstat\n")
    evs = events(conn)
    assert evs[0] == p.Invalid(f"line too long (limit {p.MAX_LINE} octets)")
    assert [e.name for e in evs[1:]] == ["stat"]


def test_too_many_errors_in_a_row_close_the_connection():
    conn = p.AdminConnection()
    conn.receive_data(b"nonsense\n" * (p.MAX_ERRORS + 5))
    evs = events(conn)
    assert len(evs) == p.MAX_ERRORS
    assert evs[-1].fatal and "too many errors, closing" in evs[-1].text
    assert conn.closed
    conn.receive_data(b"stat\n")
    assert events(conn) == []


def test_a_good_command_resets_the_error_count():
    conn = p.AdminConnection()
    conn.receive_data((b"nonsense\n" * (p.MAX_ERRORS - 1) + b"stat\n") * 3)
    evs = events(conn)
    assert not any(getattr(e, "fatal", False) for e in evs)
    assert not conn.closed


def test_quit_closes_and_later_input_is_ignored():
    conn = p.AdminConnection()
    conn.receive_data(b"quit\nstat\n")
    assert [e.name for e in events(conn)] == ["quit"]
    assert conn.closed


def test_a_token_connection_allows_only_auth_help_quit_until_authenticated():
    conn = p.AdminConnection(needs_token=True)
    conn.receive_data(b"stat\nhelp\nauth\ntok-en\n")
    refused, help_, auth = events(conn)
    assert refused == p.Invalid("authenticate first: auth, then the token on the next line")
    assert help_.name == "help"
    assert auth.name == "auth" and auth.secret == "tok-en"
    conn.authenticated = True          # the adapter decides after comparing the token
    conn.receive_data(b"stat\n")
    assert [e.name for e in events(conn)] == ["stat"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=30))
def test_any_input_gives_only_events_and_bounded_buffer(chunks):
    conn = p.AdminConnection()
    for c in chunks:
        conn.receive_data(c)
        assert len(conn._buf) <= p.MAX_LINE
        for ev in events(conn):
            assert isinstance(ev, (p.Command, p.Invalid))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(min_value=1, max_value=50))
def test_chunking_does_not_change_the_events(data, size):
    whole = p.AdminConnection()
    whole.receive_data(data)
    a = events(whole)
    parts = p.AdminConnection()
    for i in range(0, len(data), size):
        parts.receive_data(data[i:i + size])
    b = events(parts)
    assert [repr(x) for x in a] == [repr(x) for x in b]


# --- reply framing ---------------------------------------------------------------------------

def test_reply_ends_with_a_dot_line_and_dot_lines_are_stuffed():
    assert p.encode_reply(["a", ".", ".hidden", ""]) == b"a\n..\n..hidden\n\n.\n"
    assert p.encode_reply([]) == b".\n"


def test_error_reply_is_one_line_starting_error():
    assert p.encode_error("no such user: a@b.c") == b"error: no such user: a@b.c\n.\n"
    assert p.encode_error("two\nlines") == b"error: two lines\n.\n"


def test_reply_lines_never_carry_control_characters():
    raw = p.encode_reply(["a\rb\x00c\x1bd"])
    assert raw == b"a?b?c?d\n.\n"


def test_reply_line_count_is_bounded():
    raw = p.encode_reply(str(i) for i in range(p.MAX_REPLY_LINES + 25))
    lines = raw.decode().splitlines()
    assert len(lines) == p.MAX_REPLY_LINES + 2
    assert lines[-2] == "(25 more lines not shown)"


def test_reply_reader_splits_blocks_and_unstuffs():
    r = p.ReplyReader()
    data = p.encode_reply(["x", ".y"]) + p.encode_error("bad") + p.encode_reply([])
    for i in range(len(data)):
        r.receive_data(data[i:i + 1])
    assert r.replies == [(True, ["x", ".y"]), (False, ["error: bad"]), (True, [])]


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")),
                        max_size=60), max_size=20))
def test_reply_round_trip(lines):
    r = p.ReplyReader()
    r.receive_data(p.encode_reply(lines))
    [(ok, got)] = r.replies
    assert got == lines
    assert ok == (not lines or not lines[0].startswith("error:"))
