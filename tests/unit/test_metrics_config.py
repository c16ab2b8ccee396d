"""[listen] metrics: off by default, never on a public address unless allowed in so many
words; the failed-login counter counts exactly the lines fail2ban reads."""

import pytest

from mailappliance.config import ConfigError, load_settings
from mailappliance.stats import FailedLogins, failed_logins


def load(tmp_path, text):
    p = tmp_path / "m.toml"
    p.write_text(text)
    return load_settings(p, {"data": str(tmp_path / "var")}, cwd=tmp_path)


def test_off_by_default(tmp_path):
    assert load(tmp_path, "").listen.metrics == ()


@pytest.mark.parametrize("ep", ["tcp:9225:interface=127.0.0.1", "tcp6:9225:interface=\\\\:\\\\:1",
                                "unix:/run/mailappliance/metrics.sock"])
def test_loopback_and_unix_endpoints_are_accepted(tmp_path, ep):
    # (TOML strings escape backslashes: the endpoint's own \: is \\: in the file)
    got = load(tmp_path, f'[listen]\nmetrics = ["{ep}"]\n').listen.metrics
    assert got == (ep.replace("\\\\", "\\"),)


@pytest.mark.parametrize("ep", ["tcp:9225", "tcp:9225:interface=0.0.0.0",
                                "tcp:9225:interface=192.0.2.1"])
def test_a_public_address_is_refused_unless_allowed(tmp_path, ep):
    with pytest.raises(ConfigError, match="listen.metrics: .* is not on a loopback address"):
        load(tmp_path, f'[listen]\nmetrics = ["{ep}"]\n')
    s = load(tmp_path, f'[listen]\nmetrics = ["{ep}"]\n[metrics]\nallow_public = true\n')
    assert s.listen.metrics == (ep,) and s.metrics.allow_public


def test_failed_logins_counts_the_failure_events_only():
    stats = {}
    f = FailedLogins(stats)
    assert failed_logins(stats) == {"smtp": 0, "pop3": 0}
    for fmt in ("auth failed: rip={ip} user=<{user}> mech={mech} tls={tls} delay={delay:g}s",
                "login failed: rip={ip} user=<{user}> tls={tls} delay={delay:g}s",
                "login failed: rip={ip} user=<{user}> tls={tls} delay={delay:g}s",
                "auth ok: rip={ip} user=<{user}> mech={mech} tls={tls}",
                "login ok: rip={ip} user=<{user}> tls={tls} messages={count}"):
        f({"log_format": fmt})
    f({"log_format": None})
    f({})
    assert failed_logins(stats) == {"smtp": 1, "pop3": 2}
