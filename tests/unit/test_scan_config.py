"""The [scan] keys of the configuration (mailappliance/config.py): defaults from DESIGN.md,
types, and the checks that stop start-up with one line."""

from __future__ import annotations

import pytest

from mailappliance.config import ConfigError, load_settings


def load(tmp_path, scan: str):
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'hostname = "mx.test"\ndata = "{tmp_path / "var"}"\n[scan]\n{scan}\n')
    return load_settings(cfg).scan


def test_defaults_are_design_md_s():
    s = load_settings(None, {"hostname": "mx.test"}).scan
    assert (s.clamd, s.spam, s.on_error, s.timeout, s.max_bytes) == \
        ("", "", "tempfail", 30, 26214400)
    assert (s.spam_tag_score, s.spam_reject_score) == (6.0, 15.0)


def test_a_full_section(tmp_path):
    s = load(tmp_path, 'clamd = "unix:/run/clamav/clamd.ctl"\nspam = "tcp:127.0.0.1:11333"\n'
                       'on_error = "accept"\ntimeout = 5\nmax_bytes = 1000\n'
                       'spam_tag_score = 4\nspam_reject_score = 9.5\n')
    assert (s.clamd, s.spam, s.on_error, s.timeout, s.max_bytes) == \
        ("unix:/run/clamav/clamd.ctl", "tcp:127.0.0.1:11333", "accept", 5, 1000)
    assert (s.spam_tag_score, s.spam_reject_score) == (4.0, 9.5)
    assert type(s.spam_tag_score) is float
    assert load(tmp_path, 'clamd = "/run/clamav/clamd.ctl"\nspam = "rspamd:/run/r.sock"\n'
                ).spam == "rspamd:/run/r.sock"


@pytest.mark.parametrize("text, key, why", [
    ('on_error = "bounce"', "scan.on_error", "must be one of tempfail, accept"),
    ('clamd = "clamd.ctl"', "scan.clamd", "unknown endpoint type"),
    ('clamd = "tcp:127.0.0.1"', "scan.clamd", "bad endpoint"),
    ('spam = "spamd:/run/spamd.sock"', "scan.spam", "not implemented; use rspamd"),
    ('spam = "ssl:127.0.0.1:11333"', "scan.spam", "unknown endpoint type"),
    ("timeout = 0", "scan.timeout", "must be at least 1"),
    ("max_bytes = 0", "scan.max_bytes", "must be at least 1"),
    ('spam_tag_score = "high"', "scan.spam_tag_score", "expected a finite number"),
    ("spam_reject_score = nan", "scan.spam_reject_score", "expected a finite number"),
    ("spam_reject_score = inf", "scan.spam_reject_score", "expected a finite number"),
    ("spam_reject_score = true", "scan.spam_reject_score", "expected a finite number"),
    ("spam_tag_score = 20", "scan.spam_tag_score", "must not be above spam_reject_score"),
    ("virus = true", "scan.virus", "unknown key"),
])
def test_mistakes_stop_start_up_with_one_line(tmp_path, text, key, why):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    line = str(e.value)
    assert "\n" not in line and f": {key}: " in line and why in line, line
