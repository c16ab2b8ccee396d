"""descriptors.py: the reserve and each network listener's share of RLIMIT_NOFILE."""

import dataclasses
from pathlib import Path

from mailappliance import descriptors as fd
from mailappliance.config import ListenSettings, POP3Settings, Settings, SMTPSettings


def settings(**listen) -> Settings:
    base = dict(smtp=("tcp:25",), submission=("tcp:587",), submissions=(), pop3=("tcp:110",),
                pop3s=(), admin=("unix:/run/a.sock",))
    base.update(listen)
    return Settings(hostname="mx.example", data=Path("/var/lib/m"),
                    listen=dataclasses.replace(ListenSettings(), **base))


def test_reserve_counts_the_base_admin_and_delivery_slots():
    s = settings()
    assert fd.reserve_for(s) == 64 + 10 + 3 * (10 + 20)


def test_reserve_counts_inject_sessions_and_metrics_scrapes_when_they_listen():
    base = fd.reserve_for(settings())
    assert fd.reserve_for(settings(inject=("unix:/run/i.sock",))) == base + 32 * 2
    assert fd.reserve_for(settings(metrics=("tcp:9225:interface=127.0.0.1",))) == base + 8
    # the inject listener's own bound is the one counted here
    from mailappliance.pickup import service as pickup_service
    assert pickup_service.MAX_CONNECTIONS == fd.INJECT_SESSIONS


def test_everything_fits_under_a_generous_limit():
    p = fd.plan(settings(), 4096)
    assert p.fits and p.wanted == 120
    assert p.shares == {"smtp": 40, "submission": 40, "submissions": 40, "pop3": 40, "pop3s": 40}


def test_a_low_limit_cuts_every_share_alike():
    s = settings(pop3=("tcp:110", "tcp:1110"))           # two POP3 endpoints: two shares
    p = fd.plan(s, 256)
    reserve = fd.reserve_for(s)
    assert not p.fits and p.wanted == 160
    assert p.shares["smtp"] == p.shares["pop3"] == (40 * (256 - reserve)) // 160
    used = p.shares["smtp"] + p.shares["submission"] + 2 * p.shares["pop3"]
    assert used <= 256 - reserve                          # never past the reserve
    assert fd.plan(s, 100).shares["pop3"] == 0            # nothing left: every client refused


def test_unix_endpoints_take_no_share_and_bigger_limits_get_more():
    s = dataclasses.replace(settings(smtp=("tcp:25", "unix:/tmp/s")),
                            smtp=SMTPSettings(max_connections=100),
                            pop3=POP3Settings(max_connections=20))
    p = fd.plan(s, 200)
    assert p.wanted == 100 + 40 + 20
    assert p.shares["smtp"] > p.shares["submission"] > p.shares["pop3"] > 0


def test_budget_follows_a_reload_and_describes_a_cut_plan():
    b = fd.DescriptorBudget(limit=256)
    s1 = settings()
    assert b.share(s1, "pop3") < 40
    s2 = dataclasses.replace(s1, pop3=POP3Settings(max_connections=5))
    assert b.share(s2, "pop3") == 5                      # 85 wanted: fits in 256 - 164
    text = fd.describe_plan(b.plan(s1))
    assert text.startswith("descriptors: limit 256, reserve 164, network connections 120")
    assert "raise LimitNOFILE" in text
    assert "raise" not in fd.describe_plan(fd.plan(s1, 4096))


def test_raise_soft_limit_reaches_the_hard_limit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
            assert fd.raise_soft_limit() == hard
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
