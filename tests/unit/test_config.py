"""Configuration: defaults, overrides, and the exact one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailappliance.config import ConfigError, Route, load_settings


def write(tmp_path: Path, text: str, name: str = "m.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(tmp_path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_settings(p, cwd=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg, "errors are one line"
    return msg.replace(str(p), "FILE")


def test_embedded_defaults_match_design(tmp_path):
    s = load_settings(None, cwd=tmp_path)
    assert s.data == tmp_path / "var"
    assert s.listen.smtp == ("tcp:2525:interface=127.0.0.1",)
    assert s.listen.submission == ("tcp:2587:interface=127.0.0.1",)
    assert s.listen.pop3 == ("tcp:2110:interface=127.0.0.1",)
    assert s.listen.admin == (f"unix:{tmp_path / 'var' / 'admin.sock'}",)
    assert s.smtp.databytes == 10485760 and s.smtp.max_connections == 40
    assert s.queue.concurrency_local == 10 and s.queue.concurrency_remote == 20
    assert s.log.rotate_bytes == 1000000 and s.log.keep == 10
    assert s.pop3.roaming_relay_minutes == 30
    assert s.rules is None and s.hostname


def test_design_example_file_loads(tmp_path):
    rules = write(tmp_path, '127.:allow,RELAYCLIENT=""\n', "tcp.smtp")
    p = write(tmp_path, f'''
hostname = "mail.test.com"
data = "state"
default_domain = "test.com"
[listen]
smtp = ["tcp:25"]
submission = ["tcp:587"]
pop3 = ["tcp:110"]
admin = ["unix:/run/mailappliance/admin.sock"]
[smtp]
rules = "{rules}"
max_connections = 40
max_per_ip = 10
databytes = 10485760
max_recipients = 100
timeout = 1200
dnsbl = ["bl.example.net"]
dnsbl_allow = []
dnsbl_timeout = 60
[dns]
nameservers = ["127.0.0.1:5353"]
[pop3]
roaming_relay_minutes = 30
[queue]
concurrency_local = 10
concurrency_remote = 20
lifetime_days = 7
[routes]
"example.org" = "127.0.0.1:2526"
"" = "smarthost.example.net"
[log]
rotate_bytes = 1000000
keep = 10
''')
    s = load_settings(p, cwd=Path("/"))
    assert s.hostname == "mail.test.com"
    assert s.data == tmp_path / "state", "relative paths are relative to the config file"
    assert s.default_domain == "test.com"
    assert s.dns.nameservers == (("127.0.0.1", 5353),)
    assert s.smtp.dnsbl == ("bl.example.net",)
    assert s.route_for("example.org") == Route("example.org", "127.0.0.1", 2526)
    assert s.route_for("sub.example.org") == Route("example.org", "127.0.0.1", 2526)
    assert s.route_for("other.net") == Route("", "smarthost.example.net", 25)
    assert s.rules.lookup("127.0.0.1").env == {"RELAYCLIENT": ""}


def test_command_line_overrides_file(tmp_path):
    p = write(tmp_path, 'hostname = "a.example"\n[listen]\nsmtp = ["tcp:25"]\n')
    s = load_settings(p, {"hostname": "b.example", "listen.smtp": ["tcp:0:interface=127.0.0.1"],
                          "data": "d"}, cwd=tmp_path)
    assert s.hostname == "b.example"
    assert s.listen.smtp == ("tcp:0:interface=127.0.0.1",)
    assert s.data == tmp_path / "d"


def test_settings_are_immutable(tmp_path):
    s = load_settings(None, cwd=tmp_path)
    with pytest.raises(Exception):
        s.hostname = "x"  # type: ignore[misc]
    with pytest.raises(Exception):
        s.smtp.databytes = 1  # type: ignore[misc]


@pytest.mark.parametrize("text, expected", [
    ("bogus = 1\n", "FILE: bogus: unknown key"),
    ("[smtp]\nmax_connectons = 5\n", "FILE: smtp.max_connectons: unknown key"),
    ("[smtp]\nmax_connections = \"40\"\n", "FILE: smtp.max_connections: expected integer, got string"),
    ("[smtp]\nmax_connections = 0\n", "FILE: smtp.max_connections: must be at least 1, got 0"),
    ("[pop3]\nroaming_relay_minutes = true\n",
     "FILE: pop3.roaming_relay_minutes: expected integer, got boolean"),
    ("[smtp]\ndnsbl = \"bl.example.net\"\n", "FILE: smtp.dnsbl: expected list of strings, got string"),
    ("[smtp]\ndnsbl = [\"bad zone!\"]\n", "FILE: smtp.dnsbl: 'bad zone!' is not a DNS zone name"),
    ("[listen]\nsmtp = [\"tpc:25\"]\n",
     "FILE: listen.smtp: unknown endpoint type 'tpc' (use tcp:, tcp6:, unix:, ssl: or systemd:)"),
    ("[listen]\nsmtp = [\"tcp:smtp\"]\n", "FILE: listen.smtp: bad endpoint 'tcp:smtp': "),
    ("smtp = 5\n", "FILE: smtp: expected table, got integer"),
    ("[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
     "FILE: tls.cert: file not found: /nonexistent/cert.pem"),
    ("[tls]\ncert = \"/nonexistent/cert.pem\"\n", "FILE: tls: cert and key must be given together"),
    ("[smtp]\nrules = \"/nonexistent/tcp.smtp\"\n",
     "/nonexistent/tcp.smtp: cannot read rules file: No such file or directory"),
    ("[listen]\npop3s = [\"tcp:995\"]\n", "FILE: listen.pop3s: needs a [tls] cert and key"),
    ("[dns]\nnameservers = [\"127.0.0.1:dns\"]\n", "FILE: dns.nameservers: bad port in '127.0.0.1:dns'"),
    ("[routes]\n\"example.org\" = 25\n", "FILE: routes.example.org: expected \"host[:port]\", got integer"),
    ("hostname = \"bad host\"\n", "FILE: hostname: 'bad host' is not a host name"),
    ("[listen]\nadmin = [\"tcp:9000\"]\n", "FILE: listen.admin: TCP admin endpoint 'tcp:9000' needs admin.token_file"),
    ("[queue]\nlifetime_days = 1.5\n", "FILE: queue.lifetime_days: expected integer, got float"),
    ("[smtp\n", "FILE: TOML syntax error: "),
])
def test_bad_config_gives_one_exact_line(tmp_path, text, expected):
    msg = error_of(tmp_path, text)
    assert msg.startswith(expected), msg


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_settings(tmp_path / "missing.toml")
    assert str(e.value) == f"{tmp_path / 'missing.toml'}: cannot read: No such file or directory"
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'hostname = "m\xe9l.example"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(p)
    assert str(e.value) == f"{p}: not UTF-8 text"


def test_bad_rules_line_is_reported_with_its_number(tmp_path):
    rules = write(tmp_path, "# comment\n127.:allow\n1.2.3.4:permit\n", "tcp.smtp")
    msg = error_of(tmp_path, f'[smtp]\nrules = "{rules}"\n')
    assert msg.startswith(f"{rules}: line 3: expected ADDRESS:allow or ADDRESS:deny"), msg


def test_bad_pem_files_are_refused(tmp_path):
    cert = write(tmp_path, "not a cert", "c.pem")
    key = write(tmp_path, "not a key", "k.pem")
    msg = error_of(tmp_path, f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    assert msg == f"FILE: tls.cert: {cert} is not a PEM certificate"


# --- the schema and the reference generated from it ------------------------------------------

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md"


def test_committed_reference_is_what_the_schema_generates():
    from mailappliance.config import reference
    assert REFERENCE.read_text() == reference(), (
        "docs/CONFIGURATION.md is out of date: "
        "python -m mailappliance.config --reference > docs/CONFIGURATION.md")


def test_every_key_is_declared_with_a_meaning_and_documented():
    from mailappliance.config import SCHEMA, Key, Section
    keys = [k for s in SCHEMA.values()
            for k in (s.keys.values() if isinstance(s, Section) else [s])]
    assert keys and all(isinstance(k, Key) for k in keys)
    text = REFERENCE.read_text()
    for k in keys:
        assert k.doc and "\n" not in k.doc, k.name
        assert k.doc in text, k.name
    assert all(s.doc for s in SCHEMA.values() if isinstance(s, Section))


def test_limits_come_from_the_declarations(tmp_path):
    from mailappliance.config import SCHEMA
    for section, name in (("pop3", "timeout"), ("log", "keep"), ("queue", "concurrency_local")):
        spec = SCHEMA[section].keys[name]
        msg = error_of(tmp_path, f"[{section}]\n{name} = {spec.minimum - 1}\n")
        assert msg == (f"FILE: {section}.{name}: must be at least {spec.minimum}, "
                       f"got {spec.minimum - 1}")
    assert error_of(tmp_path, "bcrypt_cost = 32\n") == "FILE: bcrypt_cost: must be at most 31, got 32"


def test_command_line_names_only_keys(tmp_path):
    for name in ("listen", "routes", "smtp.nope", "hostname.x"):
        with pytest.raises(ConfigError) as e:
            load_settings(None, {name: "x"}, cwd=tmp_path)
        assert str(e.value) == f"command line: {name}: unknown option"
