"""DNSBLChecker with the FakeResolver and a Clock: rblsmtpd's behaviour, the deadline, the logs."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from mailappliance.access.dnsbl import FAIL_CLOSED_TEXT, DNSBLChecker, IDNSBLChecker, Refusal
from mailappliance.config import Settings, SMTPSettings
from mailappliance.dns import IResolver
from mailappliance.testing.resolver import FakeResolver

V6 = "2001:db8::25"
V6_NAME = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"

ZONES = {
    "bl.test": {
        "2.0.0.127": [["A", "127.0.0.2"], ["TXT", "Listed: see http://bl.test/?127.0.0.2"]],
        "3.0.0.127": [["A", "127.0.0.2"]],                                 # no TXT
        "4.0.0.127": [["A", "127.0.0.2"], ["TXT", "evil\r\nreason\x01" + "z" * 300]],
        "9.0.0.127": [["A", "127.0.0.2"], ["TXT", "listed in bl"]],
        V6_NAME: [["A", "127.0.0.4"], ["TXT", "IPv6 spam source"]],
        "7.0.0.127": [["A", "10.1.2.3"]],                 # outside 127/8: a broken list
    },
    "bl2.test": {"9.0.0.127": [["A", "127.0.0.3"], ["TXT", "listed in bl2"]]},
    "white.test": {"9.0.0.127": [["A", "127.0.0.2"]]},
}


def make(zones=("bl.test",), allow=(), resolver=None, **kw):
    clock = Clock()
    resolver = resolver or FakeResolver(ZONES)
    kw.setdefault("timeout", 10)
    return DNSBLChecker(resolver, clock, zones, allow, **kw), resolver, clock


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the check has not finished"
    return out[0]


def refusal_lines(events):
    return [e["log_format"].format(**e) for e in events
            if "rblsmtpd" in e.get("log_format", "") and "lookup error" not in e["log_format"]]


def test_interfaces():
    checker, resolver, _ = make()
    assert verifyObject(IDNSBLChecker, checker)
    assert verifyObject(IResolver, resolver)


def test_listed_client_gets_451_with_the_txt_reason_and_one_log_line():
    checker, resolver, _ = make()
    with capturedLogs() as events:
        r = result_of(checker.check("127.0.0.2", {}))
    assert r == Refusal(False, "Listed: see http://bl.test/?127.0.0.2")
    assert resolver.queries == [("2.0.0.127.bl.test", "A"), ("2.0.0.127.bl.test", "TXT")]
    assert refusal_lines(events) == [
        "rblsmtpd: 127.0.0.2 bl.test: 451 Listed: see http://bl.test/?127.0.0.2"]


def test_not_listed_client_passes_after_one_query_per_zone():
    checker, resolver, _ = make(("bl.test", "bl2.test"))
    with capturedLogs() as events:
        assert result_of(checker.check("127.0.0.1", {})) is None
    assert resolver.queries == [("1.0.0.127.bl.test", "A"), ("1.0.0.127.bl2.test", "A")]
    assert refusal_lines(events) == []


def test_listing_without_txt_has_a_default_reason():
    checker, _, _ = make()
    assert result_of(checker.check("127.0.0.3", {})) == Refusal(
        False, "client 127.0.0.3 is listed in bl.test")


def test_txt_reason_is_cut_to_200_printable_characters():
    checker, _, _ = make()
    r = result_of(checker.check("127.0.0.4", {}))
    assert r.text.startswith("evil??reason?zzz") and len(r.text) == 200


def test_permanent_setting_gives_553():
    checker, _, _ = make(permanent=True)
    r = result_of(checker.check("127.0.0.2", {}))
    assert r.permanent and r.code == 553


def test_first_listing_zone_in_configuration_order_decides():
    checker, _, _ = make(("bl2.test", "bl.test"))
    assert result_of(checker.check("127.0.0.9", {})).text == "listed in bl2"


def test_allowlist_zone_accepts_a_client_the_blocklist_lists():
    checker, resolver, _ = make(("bl.test",), ("white.test",))
    assert result_of(checker.check("127.0.0.9", {})) is None
    assert ("9.0.0.127.white.test", "A") in resolver.queries


def test_allowlist_without_entry_leaves_the_blocklist_in_charge():
    checker, _, _ = make(("bl.test",), ("white.test",))
    assert result_of(checker.check("127.0.0.2", {})).text.startswith("Listed")


def test_ipv6_client_is_looked_up_by_nibbles():
    checker, resolver, _ = make()
    assert result_of(checker.check(V6, {})) == Refusal(False, "IPv6 spam source")
    assert resolver.queries[0] == (f"{V6_NAME}.bl.test", "A")


def test_ipv4_mapped_client_is_looked_up_as_ipv4():
    checker, resolver, _ = make()
    assert result_of(checker.check("::ffff:127.0.0.2", {})) is not None
    assert resolver.queries[0] == ("2.0.0.127.bl.test", "A")


def test_rblsmtpd_empty_skips_every_lookup():
    checker, resolver, _ = make()
    assert result_of(checker.check("127.0.0.2", {"RBLSMTPD": "", "RELAYCLIENT": ""})) is None
    assert resolver.queries == []


def test_rblsmtpd_text_refuses_451_without_lookups_and_logs():
    checker, resolver, _ = make()
    with capturedLogs() as events:
        r = result_of(checker.check("192.0.2.1", {"RBLSMTPD": "you are blocked here"}))
    assert r == Refusal(False, "you are blocked here") and resolver.queries == []
    assert refusal_lines(events) == ["rblsmtpd: 192.0.2.1 RBLSMTPD: 451 you are blocked here"]


def test_rblsmtpd_dash_text_refuses_553():
    checker, _, _ = make(zones=())           # works even with no lists configured
    assert result_of(checker.check("192.0.2.1", {"RBLSMTPD": "-go away"})) == Refusal(
        True, "go away")


def test_relay_clients_are_still_checked():
    checker, _, _ = make()
    assert result_of(checker.check("127.0.0.2", {"RELAYCLIENT": ""})) is not None


def test_no_zones_no_lookups():
    checker, resolver, _ = make(zones=())
    assert result_of(checker.check("127.0.0.2", {})) is None and resolver.queries == []


def test_non_ip_client_is_not_looked_up():
    checker, resolver, _ = make()
    assert result_of(checker.check("unix-socket", {})) is None and resolver.queries == []


@pytest.mark.parametrize("how", ["servfail", "refused", "timeout"])
def test_lookup_failures_fail_open_with_a_log_line(how):
    checker, resolver, _ = make(("bl.test", "bl2.test"))
    resolver.fail("bl.test", how)
    with capturedLogs() as events:
        assert result_of(checker.check("127.0.0.2", {})) is None
    errors = [e for e in events if "lookup error" in e.get("log_format", "")]
    assert len(errors) == 1 and errors[0]["zone"] == "bl.test"
    assert errors[0]["log_level"].name == "warn"


def test_one_failing_zone_does_not_hide_a_listing_in_another():
    checker, resolver, _ = make(("bl.test", "bl2.test"))
    resolver.fail("bl.test", "servfail")
    assert result_of(checker.check("127.0.0.9", {})).text == "listed in bl2"


def test_fail_closed_answers_451_never_553():
    checker, resolver, _ = make(fail_closed=True, permanent=True)
    resolver.fail("bl.test", "servfail")
    assert result_of(checker.check("127.0.0.1", {})) == Refusal(False, FAIL_CLOSED_TEXT)


def test_a_hanging_server_is_given_up_at_the_deadline():
    checker, resolver, clock = make(("bl.test", "bl2.test"), timeout=60)
    resolver.fail("bl.test", "hang")
    d = checker.check("127.0.0.9", {})
    clock.advance(59.9)
    assert not d.called
    clock.advance(0.1)
    # bl.test gave no answer in time; bl2.test's listing still counts.
    assert result_of(d).text == "listed in bl2"
    assert all(h.called for h in resolver.hanging)
    assert not clock.getDelayedCalls()


def test_a_hanging_server_fails_open_at_the_deadline():
    checker, resolver, clock = make(timeout=5)
    resolver.fail("bl.test", "hang")
    with capturedLogs() as events:
        d = checker.check("127.0.0.2", {})
        clock.advance(5)
    assert result_of(d) is None
    (err,) = [e for e in events if "lookup error" in e.get("log_format", "")]
    assert "no answer within 5 s" in err["why"]


def test_a_hanging_txt_lookup_still_refuses_with_the_default_reason():
    checker, resolver, clock = make(timeout=5)
    real_query = resolver.query

    def query(name, rdtype, timeout=None):
        if rdtype == "TXT":
            resolver.fail(name, "hang")
        return real_query(name, rdtype, timeout)
    resolver.query = query
    d = checker.check("127.0.0.2", {})
    assert not d.called
    clock.advance(5)
    assert result_of(d) == Refusal(False, "client 127.0.0.2 is listed in bl.test")


def test_a_broken_list_answering_outside_127_8_fails_open():
    checker, _, _ = make()
    assert result_of(checker.check("127.0.0.7", {})) is None


def test_an_answered_check_cancels_its_deadline():
    checker, _, clock = make()
    result_of(checker.check("127.0.0.1", {}))
    assert not clock.getDelayedCalls()


def test_a_bug_in_the_resolver_fails_open_instead_of_failing_the_session():
    class Broken(FakeResolver):
        def query(self, name, rdtype, timeout=None):
            raise RuntimeError("boom")
    checker, _, _ = make(resolver=Broken())
    with capturedLogs():
        assert result_of(checker.check("127.0.0.2", {})) is None


def test_from_settings_and_reload():
    settings = Settings(hostname="mx.test", data=__import__("pathlib").Path("/tmp"),
                        smtp=SMTPSettings(dnsbl=("bl.test",), dnsbl_allow=("white.test",),
                                          dnsbl_timeout=7, dnsbl_permanent=True))
    checker = DNSBLChecker.from_settings(settings, FakeResolver(ZONES), Clock())
    assert (checker.zones, checker.allow_zones, checker.timeout, checker.permanent,
            checker.fail_closed) == (("bl.test",), ("white.test",), 7.0, True, False)
    import dataclasses
    checker.reload(dataclasses.replace(settings, smtp=SMTPSettings(dnsbl=("bl2.test",))))
    assert checker.zones == ("bl2.test",) and not checker.permanent
    assert result_of(checker.check("127.0.0.9", {})).text == "listed in bl2"


def test_the_deadline_holds_even_if_a_zone_never_reports():
    """A resolver handing back nonsense breaks that zone's callback; the deadline still ends
    the check, so the SMTP session is never left waiting."""
    from twisted.internet import defer

    class Nonsense(FakeResolver):
        def query(self, name, rdtype, timeout=None):
            if name.endswith(".bl.test"):
                return defer.succeed(object())
            return super().query(name, rdtype, timeout)
    checker, _, clock = make(("bl.test", "bl2.test"), resolver=Nonsense(ZONES), timeout=3)
    with capturedLogs():
        d = checker.check("127.0.0.9", {})
        assert not d.called
        clock.advance(3)
    assert result_of(d).text == "listed in bl2"
    import gc
    gc.collect()        # the broken callback's failure is logged when collected, not raised


def test_counters_for_stat_checks_refusals_and_lookups_cut_at_the_deadline():
    checker, resolver, clock = make(("bl.test", "bl2.test"), timeout=5)
    assert checker.stats == {"checks": 0, "refusals": 0, "timeouts": 0}
    result_of(checker.check("127.0.0.1", {}))                       # not listed
    result_of(checker.check("127.0.0.9", {}))                       # listed
    result_of(checker.check("127.0.0.1", {"RBLSMTPD": ""}))          # not looked up
    assert checker.stats == {"checks": 2, "refusals": 1, "timeouts": 0}
    resolver.fail("bl.test", "hang")
    d = checker.check("127.0.0.1", {})
    clock.advance(5)
    assert result_of(d) is None
    assert checker.stats == {"checks": 3, "refusals": 1, "timeouts": 1}   # bl.test's only
    checker.reload(Settings(hostname="mx.test", data=__import__("pathlib").Path("/tmp"),
                            smtp=SMTPSettings(dnsbl=("bl2.test",))))
    assert checker.stats["checks"] == 3                              # a reload keeps them
