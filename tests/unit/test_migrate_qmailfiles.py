"""The importer's parsers of qmail and vpopmail files (pure: text in, records and notes out)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailappliance.access.rules import parse_rules
from mailappliance.migrate import qmailfiles as qf
from tests.qmail_tree import SAMPLE_RULES, SAMPLE_RULES_REFUSED


def test_control_lines_skip_comments_blanks_and_trailing_space():
    text = "# comment\nexample.com  \n\n\texample.net\t\n#example.org\n"
    assert qf.control_lines(text) == [(2, "example.com"), (4, "example.net")]


def test_control_line_is_the_first_line_and_control_int_reports_garbage():
    assert qf.control_line("mail.example.com \nignored\n") == "mail.example.com"
    assert qf.control_line("") is None
    assert qf.control_int("20000000\n", "databytes") == (20000000, [])
    value, notes = qf.control_int("20M\n", "control/databytes")
    assert value is None and notes[0].where == "control/databytes:1"


def test_assign_wildcard_and_exact_entries_end_at_the_dot_line():
    text = ("+example.com-:example.com:89:89:/home/vpopmail/domains/example.com:-::\n"
            "=joe:joe:1000:1000:/home/joe:::\n"
            "garbage line\n"
            "+short:x\n"
            ".\n"
            "+after-:after:1:1:/x:-::\n")
    entries, notes = qf.parse_assign(text, "assign")
    assert [(a.wildcard, a.address, a.user, a.uid, a.home, a.line) for a in entries] == [
        (True, "example.com-", "example.com", 89, "/home/vpopmail/domains/example.com", 1),
        (False, "joe", "joe", 1000, "/home/joe", 2)]
    assert [n.where for n in notes] == ["assign:3", "assign:4"]


def test_virtualdomains_and_a_malformed_line():
    entries, notes = qf.parse_virtualdomains("Example.COM:example.com\nnocolon\n", "vd")
    assert entries == [(1, "example.com", "example.com")]
    assert notes[0].where == "vd:2"


@pytest.mark.parametrize("line, expected", [
    (":smarthost.example.org", ("", "smarthost.example.org", 25)),
    ("lists.example.org:[127.0.0.1]:2526", ("lists.example.org", "127.0.0.1", 2526)),
    (".example.info:relay.example.info", (".example.info", "relay.example.info", 25)),
    ("mx.example.com:", ("mx.example.com", "", 25)),
])
def test_smtproutes_lines(line, expected):
    routes, notes = qf.parse_smtproutes(line + "\n", "smtproutes")
    assert notes == []
    assert [(r.domain, r.host, r.port) for r in routes] == [expected]


@pytest.mark.parametrize("line", ["a:b:99999", "a:b:x", "nocolon", "a:b c d:25"])
def test_smtproutes_refuses_what_it_cannot_carry(line):
    routes, notes = qf.parse_smtproutes(line + "\n", "smtproutes")
    assert routes == [] and notes[0].where == "smtproutes:1"


def test_vpasswd_fields_clear_text_with_colons_duplicates_and_malformed_lines():
    text = ("alice:$1$abc$def:1:0:Alice:/home/vpopmail/domains/example.com/alice:5242880S\n"
            "Bob:x:1:2:Bob:/home/vpopmail/domains/example.com/bob:NOQUOTA:pa:ss\n"
            "broken:only:four:fields\n"
            "alice:dup:1:0:A:/x:NOQUOTA\n"
            ":nameless:1:0:A:/x:NOQUOTA\n")
    users, notes = qf.parse_vpasswd(text, "vpasswd")
    assert [(u.name, u.hash, u.flags, u.quota, u.clear, u.line) for u in users] == [
        ("alice", "$1$abc$def", 0, "5242880S", "", 1),
        ("bob", "x", 2, "NOQUOTA", "pa:ss", 2)]
    assert [(n.kind, n.where) for n in notes] == [
        ("error", "vpasswd:3"), ("error", "vpasswd:4"), ("error", "vpasswd:5")]


@pytest.mark.parametrize("text, expected", [
    ("NOQUOTA", (0, None)), ("", (0, None)), ("5242880S", (5242880, None)),
    ("5242880", (5242880, None)), ("10M", (10485760, None)), ("50m", (52428800, None)),
    ("1G", (1073741824, None)), ("100k", (102400, None)),
    ("1000000S,500C", (1000000, "message-count limit 500 not carried over (bytes only)")),
    ("500C", (0, "message-count limit 500 not carried over (bytes only)")),
    ("lots", (None, None)), ("5S,6S", (None, None)),
])
def test_quota_field(text, expected):
    assert qf.parse_quota(text) == expected


def test_dotqmail_lines_as_qmail_local_reads_them():
    text = ("# a comment\n\n&alice@example.com\nbob@example.org\n./Maildir/\n"
            "/home/vpopmail/domains/example.com/carol/Maildir/\n./mbox\n"
            "| /usr/bin/autorespond 86400 3 msg\n+odd\n")
    got = [(d.line, d.kind, d.value) for d in qf.parse_dotqmail(text)]
    assert got == [
        (3, "forward", "alice@example.com"), (4, "forward", "bob@example.org"),
        (5, "maildir", "./Maildir/"),
        (6, "maildir", "/home/vpopmail/domains/example.com/carol/Maildir/"),
        (7, "mbox", "./mbox"), (8, "program", "/usr/bin/autorespond 86400 3 msg"),
        (9, "unknown", "+odd")]


@pytest.mark.parametrize("name, local", [
    (".qmail-sales", "sales"), (".qmail-first:last", "first.last"), (".qmail-Info", "info"),
    (".qmail-", None), (".qmail", None), ("vpasswd", None)])
def test_dotqmail_file_names(name, local):
    assert qf.dotqmail_local(name) == local


@pytest.mark.parametrize("command, expected", [
    ("/home/vpopmail/bin/vdelivermail '' bounce-no-mailbox", ("bounce", "")),
    ("/home/vpopmail/bin/vdelivermail '' delete", ("delete", "")),
    ("/home/vpopmail/bin/vdelivermail '' postmaster@example.com",
     ("forward", "postmaster@example.com")),
    ("/home/vpopmail/bin/vdelivermail '' /home/vpopmail/domains/example.com/postmaster",
     ("maildir", "/home/vpopmail/domains/example.com/postmaster")),
])
def test_vdelivermail_default_actions(command, expected):
    v = qf.parse_vdelivermail(command)
    assert (v.mode, v.target) == expected


def test_vdelivermail_not_recognised():
    assert qf.parse_vdelivermail("/usr/bin/procmail") is None
    assert qf.parse_vdelivermail("vdelivermail ''") is None
    assert qf.parse_vdelivermail("vdelivermail 'unterminated") is None


def test_rules_check_reports_refused_lines_by_number_and_the_copy_loads_in_order():
    check = qf.check_rules(SAMPLE_RULES, "tcp.smtp")
    assert [n.where for n in check.refused] == [f"tcp.smtp:{n}" for n in SAMPLE_RULES_REFUSED]
    assert "host-name and ident rules" in check.refused[0].text
    assert check.rules == 5
    rules = parse_rules(check.text, "copy")        # the copy loads
    assert "RELAYCLIENT" in rules.lookup("127.0.0.1").env
    assert rules.lookup("127.0.0.2").env["RBLSMTPD"] == "-Blocked by the old rules"
    assert "RELAYCLIENT" in rules.lookup("192.168.1.77").env
    assert "RELAYCLIENT" not in rules.lookup("127.0.0.3").env
    # Every original line is still there, in its place; the refused one as a comment.
    kept = [line for line in check.text.splitlines() if not line.startswith("# mailappliance")]
    assert [line.removeprefix("# ") if "=mail" in line else line for line in kept] == \
        SAMPLE_RULES.splitlines()
    assert [n.text for n in check.notes] == [
        "variable QMAILQUEUE is kept in the copy but has no effect in mailappliance"]


def test_rules_relayclient_with_a_value_is_a_warning():
    check = qf.check_rules('1.2.3.4:allow,RELAYCLIENT="@fix.me"\n', "r")
    assert [(n.kind, n.where) for n in check.notes] == [("warning", "r:1")]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(':=,."\'/-0123456789abc RELAYCLIENTallowdeny\n#')),
               max_size=300))
def test_rules_check_never_raises_and_its_copy_always_loads(text):
    check = qf.check_rules(text, "r")
    parse_rules(check.text, "copy")
    assert check.rules + len(check.refused) == sum(
        1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_vpasswd_and_dotqmail_parsers_never_raise(text):
    qf.parse_vpasswd(text, "v")
    qf.parse_dotqmail(text)
    qf.parse_assign(text, "a")
    qf.parse_smtproutes(text, "s")
    qf.parse_quota(text)
