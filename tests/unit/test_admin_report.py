"""stat / queue list / relay list texts (qmailctl and qmail-qread wording)."""

from __future__ import annotations

from mailappliance.admin import report as r
from mailappliance.queue.store import QueueEntry, RecipientInfo

NOW = 1_700_000_000.0


def test_duration_forms():
    assert [r.duration(x) for x in (0, 59, 60, 185, 3600, 7380, 86400 * 4 + 7200, -3)] == \
        ["0s", "59s", "1m00s", "3m05s", "1h00m", "2h03m", "4d02h", "0s"]


def snapshot(**kw):
    base = dict(
        hostname="mx.test.com", pid=42, started=NOW - 3600,
        services=(r.ServiceStatus("smtp", ("127.0.0.1:25", "127.0.0.2:25"), NOW - 3600, 2, 17),
                  r.ServiceStatus("admin", ("/var/admin.sock",), NOW - 60, None, None)),
        queue=r.QueueStatus(3, 1, 0, 10, 1, 20),
        last_errors=("2023-11-14T22:00:00.000000Z delivery: delivery 7: deferral: x",),
        config_path="/etc/m.toml", config_loaded=NOW - 10, rules="3 rules from /etc/tcp.smtp")
    base.update(kw)
    return r.StatSnapshot(**base)


def test_stat_reads_like_qmailctl_stat():
    assert r.format_stat(snapshot(), NOW) == [
        "mailappliance: up (pid 42) 3600 seconds, hostname mx.test.com",
        "config: /etc/m.toml, loaded 10 seconds ago",
        "rules: 3 rules from /etc/tcp.smtp",
        "smtp: up 3600 seconds, listening on 127.0.0.1:25 127.0.0.2:25; "
        "connections 2 now, 17 total",
        "admin: up 60 seconds, listening on /var/admin.sock; connections 0 now, 0 total",
        "messages in queue: 3",
        "messages in queue but not yet preprocessed: 1",
        "status: local 0/10 remote 1/20",
        "last errors (1, newest last):",
        "  2023-11-14T22:00:00.000000Z delivery: delivery 7: deferral: x",
    ]


def test_stat_without_queue_rules_or_errors_says_so():
    lines = r.format_stat(snapshot(queue=None, queue_why="queue manager not built in",
                                   rules=None, last_errors=(), config_path=None,
                                   config_loaded=None), NOW)
    assert "config: embedded defaults" in lines
    assert "rules: none (nobody relays by IP)" in lines
    assert "queue: queue manager not built in" in lines
    assert lines[-1] == "last errors: none"


def test_stat_json_holds_the_same_facts_as_numbers():
    import json
    counters = r.stat_counters({"commits": 90, "dir_syncs": 12}, {"success": 80}, None)
    doc = r.stat_json(snapshot(counters=counters), NOW)
    assert json.loads(json.dumps(doc)) == doc
    assert doc["hostname"] == "mx.test.com" and doc["pid"] == 42
    assert doc["uptime_seconds"] == 3600
    assert doc["config"] == {"path": "/etc/m.toml", "loaded_seconds_ago": 10}
    assert doc["services"] == [
        {"kind": "smtp", "addresses": ["127.0.0.1:25", "127.0.0.2:25"], "up_seconds": 3600,
         "connections_now": 2, "connections_total": 17},
        {"kind": "admin", "addresses": ["/var/admin.sock"], "up_seconds": 60,
         "connections_now": 0, "connections_total": 0}]
    assert doc["queue"] == {"messages": 3, "unprocessed": 1, "local_busy": 0, "local_max": 10,
                            "remote_busy": 1, "remote_max": 20, "oldest_age_seconds": None,
                            "in_memory": None, "memory_limit": None, "backlog": None,
                            "loading": False, "dead": []}
    assert doc["counters"]["queue"] == {"commits": 90, "group_commits": 12, "write_errors": 0}
    assert doc["counters"]["deliveries"]["success"] == 80
    assert "dns" not in doc["counters"]
    assert "failed_logins" not in doc["counters"] and "tls" not in doc["counters"]
    full = r.stat_counters(None, None, None, {"smtp": 2, "pop3": 5}, 7)
    assert full == {"failed_logins": {"smtp": 2, "pop3": 5}, "tls": {"handshakes": 7}}
    aged = r.stat_json(snapshot(queue=r.QueueStatus(3, 1, 0, 10, 1, 20, 95)), NOW)
    assert aged["queue"]["oldest_age_seconds"] == 95
    assert doc["last_errors"] == ["2023-11-14T22:00:00.000000Z delivery: delivery 7: deferral: x"]
    long = r.stat_json(snapshot(last_errors=("x" * 9000,)), NOW)["last_errors"][0]
    assert len(long) == r.JSON_STRING_MAX + 3


def test_counters_since_start():
    assert r.counter_lines({"commits": 90, "dir_syncs": 12, "write_errors": 1},
                           {"success": 80, "deferral": 5, "failure": 2, "bounces": 2},
                           {"queries": 40, "cache_hits": 30, "timeouts": 1, "failures": 2}) == [
        "queue since start: 90 messages committed in 12 group commits, 7.5 per directory "
        "fsync, 1 write errors",
        "deliveries since start: 80 success, 5 deferral, 2 failure; 2 bounces",
        "dns since start: 40 lookups, 30 from cache, 1 timeouts, 2 failed",
    ]
    assert r.counter_lines(None, None, None, {"smtp": 2, "pop3": 5}, 7) == [
        "failed logins since start: 2 smtp, 5 pop3", "tls handshakes since start: 7"]
    dnsbl = {"checks": 9, "refusals": 2, "timeouts": 1}
    assert r.counter_lines(None, None, None, dnsbl=dnsbl) == [
        "dnsbl since start: 9 clients checked, 2 refused, 1 lookups cut at dnsbl_timeout"]
    assert r.stat_counters(None, None, None, dnsbl=dnsbl) == {"dnsbl": dnsbl}
    lines = r.format_stat(snapshot(queue=r.QueueStatus(3, 1, 0, 10, 1, 20, 95)), NOW)
    assert lines[lines.index("messages in queue but not yet preprocessed: 1") + 1] == \
        "oldest message in queue: 95 seconds"
    # The manager's window and backlog, and the destinations it knows dead (issue 19).
    lines = r.format_stat(snapshot(queue=r.QueueStatus(
        120_000, 0, 0, 10, 5, 20, 95, 9_000, 10_000, 111_000, True,
        ("dead.example", "[192.0.2.1]:25"))), NOW)
    assert "messages in memory: 9000 of at most 10000; in the backlog: 111000; still loading " \
        "the queue" in lines
    assert "dead destinations (2): dead.example [192.0.2.1]:25" in lines
    assert r.counter_lines({"commits": 0, "dir_syncs": 0}, None, None) == [
        "queue since start: 0 messages committed in 0 group commits, 0 write errors"]
    lines = r.format_stat(snapshot(extra=tuple(r.counter_lines(None, {"success": 1}, None))),
                          NOW)
    assert lines[lines.index("status: local 0/10 remote 1/20") + 1] == \
        "deliveries since start: 1 success, 0 deferral, 0 failure; 0 bounces"


def _entry(qid, details, next_try):
    return QueueEntry(qid, NOW - 600, 2048, "a@test.com", [], next_try, f"{qid}.0000abcd",
                      details)


def test_queue_page_per_recipient_state_attempts_last_error_and_next_page():
    details = [RecipientInfo(0, "b@example.org", "todo", 2, NOW - 65,
                             "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
                             "192.0.2.1:25: Connection refused (errno 111)"),
               RecipientInfo(1, "c@test.com", "done"),
               RecipientInfo(2, "d@test.com", "todo"),
               RecipientInfo(3, "e@example.net", "failed", failure="192.0.2.9 does not like "
                             "recipient.\nRemote host said: 550 no such user"),
               RecipientInfo(4, "f@example.org", "todo", 1, NOW - 5, "x")]
    entries = [_entry(100, details, NOW + 300), _entry(101, details[:1], NOW - 5)]
    lines = r.format_queue_page(entries, NOW, total=7, more=5, delivering={100: {4}})
    assert lines == [
        "100.0000abcd  14 Nov 2023 22:03:20 GMT  age 10m00s  2048 bytes  from <a@test.com>  "
        "next try in 5m00s",
        "  deferred  b@example.org  attempts 2, last 1m05s ago",
        "      last error: Sorry, I wasn't able to establish an SMTP connection. (#4.4.1) / "
        "192.0.2.1:25: Connection refused (errno 111)",
        "  done  c@test.com",
        "  queued  d@test.com",
        "  failed  e@example.net",
        "      error: 192.0.2.9 does not like recipient. / Remote host said: 550 no such user",
        "  delivering  f@example.org  attempts 1, last 5s ago",
        "      last error: x",
        "101.0000abcd  14 Nov 2023 22:03:20 GMT  age 10m00s  2048 bytes  from <a@test.com>  "
        "next try now",
        "  deferred  b@example.org  attempts 2, last 1m05s ago",
        "      last error: Sorry, I wasn't able to establish an SMTP connection. (#4.4.1) / "
        "192.0.2.1:25: Connection refused (errno 111)",
        "... 5 more messages: queue list --after 101",
        "7 messages",
    ]
    assert r.format_queue_page([], NOW, 0, 0) == ["0 messages"]
    # A page never grows past max_lines: it stops early and the next page starts there.
    cut = r.format_queue_page(entries, NOW, total=7, more=5, max_lines=12)
    assert cut[-2:] == ["... 6 more messages: queue list --after 100", "7 messages"]


def test_queue_json_is_one_bounded_line_per_recipient_then_the_totals():
    import json
    long = RecipientInfo(0, "b@example.org", "todo", 1, NOW, "y" * 5000)
    lines = r.queue_json_lines([_entry(100, [long, RecipientInfo(1, "c@test.com", "done")],
                                       NOW)], NOW, total=3, more=2)
    assert all(len(l) < 4096 for l in lines)
    first, second, totals = map(json.loads, lines)
    assert first["id"] == second["id"] == "100.0000abcd"
    assert (first["state"], first["attempts"], len(first["last_error"])) == (
        "deferred", 1, r.JSON_STRING_MAX + 3)
    assert second["state"] == "done" and second["last_error"] is None
    assert totals == {"total": 3, "more": 2, "next_after": 100}


def test_grants_list():
    assert r.format_grants([("192.0.2.1", 90.0), ("::1", 1700.0)]) == [
        "192.0.2.1  expires in 1m30s", "::1  expires in 28m20s", "2 grants"]
