"""tcprules syntax: ucspi-tcp's documented examples, our extensions, errors with line numbers."""

from __future__ import annotations


import pytest
from hypothesis import given, strategies as st

from mailappliance.access.rules import DEFAULT_ALLOW, RulesError, parse_rules

# The examples of ucspi-tcp's tcprules documentation (host-name and ident rules aside: we never
# do DNS or ident lookups on connect).
UCSPI_EXAMPLE = """\
# from the tcprules page
18.23.0.32:allow,WHO="second"
1.2.3.37-53:deny
127.:allow,RELAYCLIENT=""
10.2-3.:allow,TENNET="yes"
18.:allow,ORIGIN=/M I T/
:allow,WHO="fourth"
"""


def test_ucspi_examples():
    r = parse_rules(UCSPI_EXAMPLE)
    assert r.lookup("18.23.0.32").env == {"WHO": "second"}
    assert r.lookup("18.23.0.33").env == {"ORIGIN": "M I T"}, "any quote character"
    for ip in ("1.2.3.37", "1.2.3.45", "1.2.3.53"):
        assert r.lookup(ip).allow is False, ip
    assert r.lookup("1.2.3.36").env == {"WHO": "fourth"}
    assert r.lookup("1.2.3.54").allow is True
    d = r.lookup("127.0.0.1")
    assert d.allow and d.env == {"RELAYCLIENT": ""} and d.line == 4
    assert r.lookup("10.2.99.1").env == {"TENNET": "yes"}
    assert r.lookup("10.3.0.1").env == {"TENNET": "yes"}
    assert r.lookup("10.4.0.1").env == {"WHO": "fourth"}
    assert r.lookup("192.0.2.1").env == {"WHO": "fourth"}


def test_first_match_wins_in_file_order():
    r = parse_rules(":deny\n127.0.0.1:allow\n")
    assert r.lookup("127.0.0.1").allow is False
    r = parse_rules("127.0.0.1:allow,A=\"1\"\n127.:deny\n:deny\n")
    assert r.lookup("127.0.0.1").allow is True
    assert r.lookup("127.0.0.2").allow is False
    r = parse_rules("127.0.0.1:allow,A=\"1\"\n127.0.0.1:deny\n")
    assert r.lookup("127.0.0.1").env == {"A": "1"}


def test_cidr_and_ipv6_extensions():
    r = parse_rules("10.0.0.0/8:deny\n2001:db8::/32:allow,V6=\"net\"\n::1:allow,RELAYCLIENT=\"\"\n"
                    "[2001:db8::5]:deny\n:allow\n")
    assert r.lookup("10.200.1.1").allow is False
    assert r.lookup("11.0.0.1").allow is True
    assert r.lookup("2001:db8::7").env == {"V6": "net"}
    assert r.lookup("2001:db8::5").env == {"V6": "net"}, "the /32 line comes first"
    assert r.lookup("::1").env == {"RELAYCLIENT": ""}
    assert r.lookup("::ffff:10.1.2.3").allow is False, "v4-mapped clients are IPv4 clients"


def test_no_rule_matches_means_allow_without_env():
    r = parse_rules("127.:allow,RELAYCLIENT=\"\"\n")
    assert r.lookup("192.0.2.1") == DEFAULT_ALLOW
    assert parse_rules("").lookup("127.0.0.1") == DEFAULT_ALLOW


def test_env_quoting_and_first_assignment():
    r = parse_rules("1.2.3.4:allow,RBLSMTPD=\"-go away, now\",X='a\"b',RBLSMTPD=\"other\"\n")
    assert dict(r.lookup("1.2.3.4").env) == {"RBLSMTPD": "-go away, now", "X": 'a"b'}


@pytest.mark.parametrize("line, error", [
    ("1.2.3.4:permit", "line 1: expected ADDRESS:allow or ADDRESS:deny"),
    ("1.2.3.4", "line 1: expected ADDRESS:allow or ADDRESS:deny"),
    ("1.2.3.4:allow,RELAYCLIENT", "line 1: assignment without '='"),
    ("1.2.3.4:allow,RELAYCLIENT=\"open", "line 1: unterminated value for RELAYCLIENT"),
    ("1.2.3.4:allow,1BAD=\"x\"", "line 1: bad variable name '1BAD'"),
    ("1.2.3.4:allowX", "line 1: expected ADDRESS:allow or ADDRESS:deny"),
    ("1.2.3.999:deny", "line 1: octet out of range in '1.2.3.999'"),
    ("1.2.3.9-3:deny", "line 1: empty range '9-3'"),
    ("1.2.3.x:deny", "line 1: cannot parse address '1.2.3.x'"),
    ("10.0.0.0/33:deny", "line 1: bad CIDR network '10.0.0.0/33'"),
    ("2001:db8::zz:deny", "line 1: bad IPv6 address"),
    ("=host.example.com:deny", "line 1: host-name and ident rules"),
    ("joe@127.0.0.1:allow", "line 1: host-name and ident rules"),
    ("1.2.3.4:allow RELAYCLIENT=\"\"", "line 1: expected ADDRESS:allow or ADDRESS:deny"),
])
def test_errors_name_the_line(line, error):
    with pytest.raises(RulesError) as e:
        parse_rules(line + "\n", "tcp.smtp")
    assert str(e.value).startswith("tcp.smtp: " + error), str(e.value)


def test_error_line_number_counts_comments_and_blanks():
    with pytest.raises(RulesError) as e:
        parse_rules("# c\n\n127.:allow\nbroken\n", "f")
    assert str(e.value).startswith("f: line 4:")


def test_ten_thousand_rules_compile_once_and_look_up_fast():
    lines = [f"10.{i // 250}.{i % 250}.1:deny" for i in range(9000)]
    lines += [f"172.16.{i}.0/24:allow,N=\"{i}\"" for i in range(256)]
    lines += [f"192.168.{i}.:allow" for i in range(256)] + [":allow,LAST=\"1\""]
    r = parse_rules("\n".join(lines))
    assert r.count == len(lines)
    assert r.lookup("10.3.7.1").allow is False
    assert r.lookup("172.16.77.9").env == {"N": "77"}
    assert r.lookup("8.8.8.8").env == {"LAST": "1"}
    # Not a timing assertion: the lookup probes a bounded number of tables, whatever the count.
    assert len(r._nets4) == 1 and len(r._prefix) == 256


@given(st.ip_addresses(v=4))
def test_lookup_matches_a_linear_first_match_scan(ip):
    text = "10.0.0.0/8:deny\n127.:allow,R=\"\"\n192.168.1.10-20:allow,B=\"\"\n:allow\n"
    r = parse_rules(text)
    s = str(ip)
    import ipaddress
    if ip in ipaddress.ip_network("10.0.0.0/8"):
        expected = (False, {})
    elif s.startswith("127."):
        expected = (True, {"R": ""})
    elif s.startswith("192.168.1.") and 10 <= int(s.split(".")[3]) <= 20:
        expected = (True, {"B": ""})
    else:
        expected = (True, {})
    d = r.lookup(s)
    assert (d.allow, dict(d.env)) == expected


@given(st.text(max_size=200))
def test_parser_never_raises_anything_but_rules_error(text):
    try:
        parse_rules(text)
    except RulesError:
        pass
