"""The multilog replacement: line format, areas, secrets, size rotation and retention."""

from __future__ import annotations

import io
import os
import re
import time

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


# --- the fast paths: same text as the generic ones --------------------------------------------

class _Obj:
    def __str__(self):
        return "obj-str"

    def __repr__(self):
        return "obj-repr"


@pytest.mark.parametrize("fmt,kw", [
    ("new msg {qid}", {"qid": 17}),
    ("delivery {d}: {status}: {text}", {"d": 3, "status": "success", "text": "did_1+0+0/"}),
    ("{a!r} {a!s} {a!a} {a}", {"a": "é\n"}),
    ("{o} {o!r}", {"o": _Obj()}),
    ("{n:>6} {f:.2f} {n:x}", {"n": 42, "f": 3.14159}),
    ("{missing} here", {}),                       # Twisted's "Unable to format" text
    ("{call()}", {"call": lambda: "called"}),     # Twisted's call syntax: generic path
    ("{a.real} {b[0]}", {"a": 5, "b": [7]}),
    ("{0} positional", {}),
    ("unbalanced {", {}),
    ("{{literal}} {x}", {"x": 1}),
    ("{x:{w}}", {"x": 1, "w": 4}),
    (b"bytes {x}", {"x": 1}),
    (None, {}),
])
def test_event_text_equals_twisted_format_event(fmt, kw):
    from twisted.logger import formatEvent
    ev = _event(fmt, **kw)
    for _ in range(2):                            # second time from the cache
        assert malog.event_text(ev) == formatEvent(ev)


def test_format_time_cache_gives_the_same_text_across_seconds():
    whens = [1_700_000_000.25, 1_700_000_000.9999996, 1_700_000_001.5, 1_699_999_999.0,
             1_700_000_000.0, 86399.999999, 0.0]
    for when in whens:
        secs = int(when)
        micros = int(round((when - secs) * 1_000_000))
        if micros >= 1_000_000:
            secs, micros = secs + 1, micros - 1_000_000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"
        assert malog.format_time(when) == expected


def test_write_lines_rotates_exactly_like_line_by_line_writes(tmp_path):
    lines = [f"line {i:04d} " + "y" * (i % 300) for i in range(400)] + ["z" * 5000]
    one = malog.RotatingLog(tmp_path / "one", rotate_bytes=4096, keep=100, clock=Clock())
    for line in lines:
        one.write_line(line)
    one.close()
    many = malog.RotatingLog(tmp_path / "many", rotate_bytes=4096, keep=100, clock=Clock())
    for i in range(0, len(lines), 37):
        many.write_lines(lines[i:i + 37])
    many.close()
    a = [p.read_bytes() for p in malog.iter_log_files(tmp_path / "one")]
    b = [p.read_bytes() for p in malog.iter_log_files(tmp_path / "many")]
    assert a == b and len(a) > 5 and one.rotations == many.rotations


class _ThreadReactor:
    """task.Clock plus callFromThread, recording which one was used."""

    def __init__(self):
        from twisted.internet.task import Clock as TaskClock
        self.clock = TaskClock()
        self.from_thread = []

    def callLater(self, delay, f, *a):
        return self.clock.callLater(delay, f, *a)

    def seconds(self):
        return self.clock.seconds()

    def callFromThread(self, f, *a):
        self.from_thread.append((f, a))


def test_observer_with_a_reactor_writes_once_per_turn_or_interval_and_flushes_on_stop(tmp_path):
    import threading
    reactor = _ThreadReactor()
    log = malog.RotatingLog(tmp_path, rotate_bytes=1_000_000, keep=3, clock=Clock())
    writes = []
    real = log._write_all
    log._write_all = lambda data: (writes.append(data), real(data))
    obs = malog.FileLogObserver(log, reactor=reactor)
    obs.start()
    for i in range(3):
        obs(_event("turn one {i}", i=i))
    assert not writes                              # nothing yet: the turn is not over
    reactor.clock.advance(0)
    assert len(writes) == 1                        # a quiet server: written at the turn's end
    assert log.current.read_text().count("turn one") == 3
    # busy: lines of the next turns within FLUSH_INTERVAL wait for its end and go together
    obs(_event("turn two"))
    reactor.clock.advance(0)
    reactor.clock.advance(malog.FLUSH_INTERVAL / 2)
    obs(_event("turn three"))
    reactor.clock.advance(0)
    assert len(writes) == 1
    reactor.clock.advance(malog.FLUSH_INTERVAL / 2)
    assert len(writes) == 2                        # two turns' lines, one write
    lines = log.current.read_text().splitlines()
    assert lines[-2].endswith("smtp: turn two") and lines[-1].endswith("smtp: turn three")
    reactor.clock.advance(1)
    assert len(writes) == 2                        # no timer left behind, no empty writes
    obs(_event("after a quiet second"))
    reactor.clock.advance(0)
    assert len(writes) == 3                        # quiet again: at the turn's end
    reactor.clock.rightNow -= 3600                 # the wall clock is stepped back an hour
    obs(_event("after the clock went back"))
    reactor.clock.advance(malog.FLUSH_INTERVAL)
    assert len(writes) == 4                        # still within one interval, not an hour
    # an event from another thread is handed to the reactor thread
    t = threading.Thread(target=obs, args=(_event("from a thread"),))
    t.start()
    t.join()
    assert len(reactor.from_thread) == 1
    f, a = reactor.from_thread.pop()
    f(*a)
    assert log.current.read_text().splitlines()[-1].endswith("smtp: from a thread")
    obs(_event("last words"))
    obs.stop()                                     # written although the turn never ended
    assert log.current.read_text().splitlines()[-1].endswith("smtp: last words")
    assert log.write_errors == 0


def test_observer_with_a_writer_thread_never_writes_on_the_reactor_thread(tmp_path):
    import threading
    import time as _time
    reactor = _ThreadReactor()
    log = malog.RotatingLog(tmp_path, rotate_bytes=1_000_000, keep=3, clock=Clock())
    writers = []
    real = log._write_all
    log._write_all = lambda data: (writers.append(threading.get_ident()), real(data))
    obs = malog.FileLogObserver(log, reactor=reactor, writer_thread=True)
    obs.start()
    assert obs._writer is not None and obs._writer.daemon
    for i in range(5):
        obs(_event("turn one {i}", i=i))
    reactor.clock.advance(0)                       # the turn ends: lines go to the writer
    def text():
        return log.current.read_text() if log.current.exists() else ""
    deadline = _time.monotonic() + 10
    while text().count("turn one") < 5 and _time.monotonic() < deadline:
        _time.sleep(0.01)
    assert log.current.read_text().count("turn one") == 5
    assert writers and threading.get_ident() not in writers
    # at stop, lines handed over and lines of an unfinished turn are all written, in order
    obs(_event("handed over"))
    reactor.clock.advance(malog.FLUSH_INTERVAL)
    obs(_event("last words"))
    writer = obs._writer
    obs.stop()
    assert not writer.is_alive()
    lines = log.current.read_text().splitlines()
    assert lines[-2].endswith("smtp: handed over") and lines[-1].endswith("smtp: last words")
    assert log.write_errors == 0


def test_logging_service_cuts_twistds_stdout_copy_to_health_while_files_run(tmp_path):
    from twisted.logger import textFileLogObserver
    settings = load_settings(None, {"data": str(tmp_path / "var")}, cwd=tmp_path)
    publisher = LogPublisher()
    stdout = io.StringIO()
    twistd_observer = textFileLogObserver(stdout)      # what twistd -n installs
    publisher.addObserver(twistd_observer)
    svc = malog.LoggingService(settings, publisher=publisher, stdout=stdout)
    queue = Logger(namespace="mailappliance.queue.manager", observer=publisher)
    server = Logger(namespace="mailappliance.service", observer=publisher)
    queue.info("new msg {qid}", qid=1)                 # before start: full copy
    svc.startService()
    queue.info("new msg {qid}", qid=2)                 # files only
    queue.info("delivery {d}: {status}: {text}", d=1, status="deferral", text="busy")
    queue.warn("warning: msg {qid} is corrupt", qid=3)
    server.info("listening on {port}", port=25)
    svc.stopService()
    queue.info("new msg {qid}", qid=4)                 # after stop: full copy again
    out = stdout.getvalue()
    assert "new msg 1" in out and "new msg 4" in out
    assert "new msg 2" not in out
    assert "deferral: busy" in out and "is corrupt" in out and "listening on 25" in out
    text = (settings.log_directory / "current").read_text()
    assert "delivery: new msg 2" in text and "delivery: delivery 1: deferral: busy" in text
    assert twistd_observer in publisher._observers
    assert not any(isinstance(o, malog.HealthOnly) for o in publisher._observers)


def test_twisted_port_chatter_is_left_out_of_the_mail_log():
    """Twisted's legacy "X starting on N" / "(TCP Port N Closed)" lines, logged whatever a
    factory's `noisy` says, never reach the files or the journal; our own lines do."""
    from twisted.logger import LogLevel
    chatter = ["SMTPFactory starting on 25", "(TCP Port 25 Closed)",
               "<class 'mailappliance.queue.manager._Trigger'> starting on '/var/q/trigger'",
               "(UNIX Port /run/admin.sock Closed)", "(Port '/var/q/trigger' Closed)"]
    for text in chatter:
        event = {"log_namespace": "log_legacy", "message": (text,), "log_format": "{log_text}",
                 "log_text": text, "log_level": LogLevel.info}
        assert malog.is_chatter(event), text
    assert not malog.is_chatter({"log_namespace": "log_legacy",
                                 "message": ("Received SIGTERM, shutting down.",)})
    assert not malog.is_chatter({"log_namespace": "mailappliance.smtp",
                                 "message": ("x starting on y",)})
