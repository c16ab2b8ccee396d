"""The [pop3] settings POP3 relies on, checked at load time with one clear line."""

import pytest

from mailappliance.config import ConfigError, load_settings
from tests.pop3_support import make_cert


def test_require_tls_without_tls_stops_startup_with_one_line(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('hostname = "mx.test.example"\n[pop3]\nrequire_tls = true\n')
    with pytest.raises(ConfigError) as e:
        load_settings(conf, cwd=tmp_path)
    assert str(e.value) == f"{conf}: pop3.require_tls: needs a [tls] cert and key (for STLS)"


def test_require_tls_with_tls_and_defaults(tmp_path):
    cert, key = make_cert(tmp_path)
    conf = tmp_path / "c.toml"
    conf.write_text(f'hostname = "mx.test.example"\n[tls]\ncert = "{cert}"\nkey = "{key}"\n'
                    "[pop3]\nrequire_tls = true\n")
    s = load_settings(conf, cwd=tmp_path)
    assert s.pop3.require_tls and s.pop3.timeout == 600 and s.pop3.roaming_relay_minutes == 30
    conf.write_text('hostname = "mx.test.example"\n[pop3]\ntimeout = 599\n')
    with pytest.raises(ConfigError, match="pop3.timeout: must be at least 600"):
        load_settings(conf, cwd=tmp_path)
