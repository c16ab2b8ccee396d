"""The multilog replacement: line format, areas, secrets, size rotation and retention."""

from __future__ import annotations

import io
import os
import re

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from mailappliance import logging as malog
from mailappliance.config import load_settings


def _event(fmt="hello", namespace="mailappliance.smtp.protocol", level=LogLevel.info,
           when=1_700_000_000.25, **kw):
    ev = {"log_format": fmt, "log_namespace": namespace, "log_level": level, "log_time": when}
    ev.update(kw)
    return ev


@pytest.mark.parametrize("namespace,area", [
    ("mailappliance.smtp.protocol.SMTPServer", "smtp"),
    ("mailappliance.smtp", "smtp"),
    ("mailappliance.access.rules", "smtp"),
    ("mailappliance.access.dnsbl.DNSBL", "dns"),
    ("mailappliance.dns.Resolver", "dns"),
    ("mailappliance.queue.manager.QueueManager", "delivery"),
    ("mailappliance.delivery.local", "delivery"),
    ("mailappliance.pop3.protocol.POP3", "pop3"),
    ("mailappliance.admin.service.AdminProtocol", "admin"),
    ("mailappliance.service.Listener", "server"),
    ("log_legacy", "server"),
    ("mailappliance.smtpx", "server"),       # a prefix match needs a dot boundary
    ("", "server"),
])
def test_area_comes_from_the_namespace(namespace, area):
    assert malog.area_of({"log_namespace": namespace}) == area


def test_event_may_name_its_area_but_only_a_known_one():
    assert malog.area_of({"log_namespace": "x", "log_area": "pop3"}) == "pop3"
    assert malog.area_of({"log_namespace": "x", "log_area": "evil\nline"}) == "server"


def test_control_characters_from_the_network_cannot_forge_a_second_line():
    ev = _event("helo {name}", name="x\r\n2024-01-01 smtp: forged\x00")
    [(area, text)] = malog.event_lines(ev)
    assert area == "smtp"
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    assert text == "helo x\\r\\n2024-01-01 smtp: forged\\x00"


def test_an_oversized_event_is_cut_to_the_line_limit():
    text = malog.clean("a" * (malog.MAX_LOG_LINE + 500))
    assert text.startswith("a" * malog.MAX_LOG_LINE)
    assert text.endswith("...[500 more characters]")


@pytest.mark.parametrize("key", sorted(malog.SECRET_KEYS))
def test_secret_named_fields_are_redacted_even_if_the_format_uses_them(key):
    ev = _event("login {user} with {%s}" % key, user="test@test.com", **{key: "Passw0rd!"})
    [(_, text)] = malog.event_lines(ev)
    assert "Passw0rd!" not in text
    assert text == f"login test@test.com with {malog.REDACTED}"


def test_a_failure_gives_a_summary_line_and_prefixed_traceback_lines():
    try:
        raise ValueError("boom\nsecond")
    except ValueError:
        f = Failure()
    ev = _event("delivery {n}: crashed", namespace="mailappliance.delivery.local", n=4,
                log_failure=f, level=LogLevel.critical)
    lines = malog.event_lines(ev)
    assert lines[0] == ("delivery", "delivery 4: crashed: ValueError: boom\\nsecond")
    assert len(lines) > 2
    assert all(a == "delivery" and t.startswith("traceback: ") for a, t in lines[1:])


def test_a_broken_format_string_is_still_logged():
    [(_, text)] = malog.event_lines(_event("value {missing"))
    assert "missing" in text


def test_time_format_is_iso_utc_with_microseconds():
    assert malog.format_time(1_700_000_000.25) == "2023-11-14T22:13:20.250000Z"
    assert malog.format_time(0.9999999) == "1970-01-01T00:00:01.000000Z"


def test_tai64n_label_matches_daemontools():
    # tai64n of UNIX 0 is @4000000000000000a (2^62 + 10 TAI-UTC seconds) + 0 ns.
    assert malog.tai64n(0) == "@400000000000000a00000000"
    assert malog.tai64n(1.5) == "@400000000000000b1dcd6500"
    assert malog.tai64n(2) > malog.tai64n(1.999)


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        self.t += 0.001
        return self.t


def _write(log, n, width=100):
    lines = [f"line {i:06d} " + "x" * (width - 12) for i in range(n)]
    for line in lines:
        log.write_line(line)
    return lines


def test_rotation_by_size_keeps_keep_files_and_loses_no_line_of_the_newest(tmp_path):
    log = malog.RotatingLog(tmp_path / "log", rotate_bytes=4096, keep=3, clock=Clock())
    lines = _write(log, 500)       # 500 * 101 bytes = ~12 rotations worth
    log.close()
    files = list(malog.iter_log_files(tmp_path / "log"))
    names = sorted(os.listdir(tmp_path / "log"))
    assert len(names) == 3, names                       # keep = total files, like multilog n
    assert names[-1] == "current"
    assert all(re.fullmatch(r"@[0-9a-f]{24}\.s", n) for n in names[:-1])
    for path in files:
        size = path.stat().st_size
        assert 0 < size <= 4096
    # The kept files hold the newest lines, whole and in order, ending with the last one.
    text = "".join(p.read_text() for p in files).splitlines()
    assert text == lines[-len(text):]
    assert log.rotations >= 10


def test_a_rotated_file_is_never_larger_than_rotate_bytes_and_never_splits_a_line(tmp_path):
    log = malog.RotatingLog(tmp_path, rotate_bytes=4096, keep=50, clock=Clock())
    _write(log, 300, width=333)
    for path in log.old_files():
        data = path.read_bytes()
        assert len(data) <= 4096
        assert data.endswith(b"\n")
        # a file is only rotated when the next line would not fit
        assert len(data) + 334 > 4096


def test_reopening_appends_to_current_and_counts_its_size(tmp_path):
    log = malog.RotatingLog(tmp_path, rotate_bytes=4096, keep=3, clock=Clock())
    _write(log, 10)
    log.close()
    log2 = malog.RotatingLog(tmp_path, rotate_bytes=4096, keep=3, clock=Clock())
    _write(log2, 40)
    log2.close()
    assert len(log2.old_files()) == 1
    total = sum(p.stat().st_size for p in malog.iter_log_files(tmp_path))
    assert total == 50 * 101


def test_configure_applies_new_limits_and_prunes(tmp_path):
    log = malog.RotatingLog(tmp_path, rotate_bytes=4096, keep=10, clock=Clock())
    _write(log, 400)
    assert len(log.old_files()) == 9
    log.configure(rotate_bytes=8192, keep=2)
    assert len(log.old_files()) == 1
    log.close()


def test_a_write_error_is_counted_not_raised(tmp_path):
    blocker = tmp_path / "log"
    blocker.write_text("a file where the directory should be")
    log = malog.RotatingLog(blocker, rotate_bytes=4096, keep=3)
    log.write_line("lost")
    log.write_line("lost too")
    assert log.write_errors == 2


def test_a_single_huge_line_is_cut_to_one_file(tmp_path):
    log = malog.RotatingLog(tmp_path, rotate_bytes=4096, keep=3, clock=Clock())
    log.write_line("y" * 10000)
    log.close()
    assert log.current.stat().st_size == 4096


def test_file_observer_buffers_until_started_and_remembers_errors(tmp_path):
    log = malog.RotatingLog(tmp_path, rotate_bytes=4096, keep=3, clock=Clock())
    obs = malog.FileLogObserver(log)
    obs(_event("early {n}", n=1))
    assert not log.current.exists()
    obs.start()
    obs(_event("late", level=LogLevel.warn, namespace="mailappliance.pop3.protocol"))
    obs.stop()
    lines = log.current.read_text().splitlines()
    assert lines == ["2023-11-14T22:13:20.250000Z smtp: early 1",
                     "2023-11-14T22:13:20.250000Z pop3: late"]
    assert list(obs.last_errors) == [lines[1]]


def test_file_observer_early_buffer_is_bounded(tmp_path):
    log = malog.RotatingLog(tmp_path, rotate_bytes=1_000_000, keep=3, clock=Clock())
    obs = malog.FileLogObserver(log)
    for i in range(malog.EARLY_BUFFER_LINES + 7):
        obs(_event("e {i}", i=i))
    assert len(obs.early) == malog.EARLY_BUFFER_LINES
    obs.start()
    obs.stop()
    lines = log.current.read_text().splitlines()
    assert lines[0].endswith("server: 7 early log lines dropped")
    assert lines[1].endswith("smtp: e 7")
    assert len(lines) == malog.EARLY_BUFFER_LINES + 1


def test_journal_observer_writes_priorities_and_filters_while_files_run():
    out = io.StringIO()
    active = [False]
    obs = malog.JournalObserver(out, files_active=lambda: active[0])
    obs(_event("new msg 1", namespace="mailappliance.queue.manager"))
    obs(_event("bad", level=LogLevel.error))
    active[0] = True
    obs(_event("new msg 2", namespace="mailappliance.queue.manager"))       # in the files only
    obs(_event("listening", namespace="mailappliance.service.Listener"))   # server: kept
    obs(_event("warned", level=LogLevel.warn, namespace="mailappliance.pop3.x"))
    assert out.getvalue().splitlines() == [
        "<6>delivery: new msg 1", "<3>smtp: bad", "<6>server: listening", "<4>pop3: warned"]


def test_logging_service_writes_events_of_a_real_logger_and_detaches(tmp_path):
    settings = load_settings(None, {"data": str(tmp_path / "var")}, cwd=tmp_path)
    publisher = LogPublisher()
    svc = malog.LoggingService(settings, publisher=publisher)
    logger = Logger(namespace="mailappliance.admin.service", observer=publisher)
    logger.info("admin: before start")
    svc.startService()
    logger.info("admin: {what}", what="after start", password="never")
    svc.reload(settings)
    svc.stopService()
    logger.info("after stop")
    text = (settings.log_directory / "current").read_text()
    assert re.search(r"^\S+Z admin: admin: before start$", text, re.M)
    assert "admin: admin: after start" in text
    assert "never" not in text and "after stop" not in text


def test_deferred_and_failed_deliveries_count_as_errors_successes_do_not():
    ev = _event("delivery {d}: {status}: {text}", namespace="mailappliance.queue.manager",
                d=3, status="deferral", text="Connection refused")
    assert malog.is_error(ev)
    assert malog.is_error(dict(ev, status="failure"))
    assert not malog.is_error(dict(ev, status="success"))
    assert not malog.is_error(_event("new msg 4"))
