"""Logs like multilog: one line per event, a prefix per area, files rotated by size.

Every Twisted log event becomes one line ``<time> <area>: <text>`` in ``<log dir>/current``
(``settings.log_directory``). When the next line would take ``current`` past
``[log] rotate_bytes``, ``current`` is fsynced and renamed to ``@<tai64n>.s`` (multilog's
names, so ``tai64nlocal`` and ``ls`` order them by time) and a new ``current`` is started; of
the old files only the newest ``keep - 1`` stay, so the directory never holds more than
``keep`` files (multilog ``n``).

Areas (``smtp``, ``delivery``, ``pop3``, ``admin``, ``dns``, ``server``) come from the
event's namespace, so ``grep ' smtp: '`` or ``awk '$2 == "pop3:"'`` splits the log. An event
may name its area itself with a ``log_area`` key.

Nothing secret is written: values of keys that name secrets (``password``, ``token``, ...)
are replaced before formatting, and control characters from network input (CR, LF, NUL) are
escaped, so a client can neither forge a log line nor hide one.

Cost per line (the mail log has about ten lines per message, logged on the reactor thread):
lines are collected and written with one write() per reactor turn (see FileLogObserver: an
abrupt death of the process can lose the lines of its last turn, i.e. of its last few
milliseconds; a normal stop writes everything), the time text is made once per second, the
area is cached per namespace, and plain ``{name}`` format strings are parsed once (the text
is the same as twisted.logger.formatEvent's; anything unusual goes through formatEvent).

Under plain ``twistd -n`` (no ``--logger``), twistd's own observer would write a second,
complete copy of every event to standard output, formatted by Twisted's generic code and
flushed per event (under load several times the cost of the file log).  While the files hold
the mail log, that copy is cut to what the journal observer passes (see LoggingService).

With ``[log] stdout = true`` no files are written: events go to twistd's own log (standard
output under ``twistd -n``). ``twistd --logger=mailappliance.logging.journal`` makes that
standard output journald-friendly: ``<priority>area: text``, no timestamp (the journal adds
one). While the file log is active the journal observer passes only warnings, errors and
``server`` events (start, listen, stop), so the journal shows the service's health and the
files hold the mail log.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import string
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Deque, Iterable, TextIO

from twisted.application import service
from twisted.logger import (ILogObserver, LogLevel, formatEvent, globalLogPublisher)
from zope.interface import implementer

# --- limits ----------------------------------------------------------------------------------

# One event is one line, at most this many characters; a longer text is cut with a marker.
# A sane event is well under 1 KB; this keeps one runaway event (a huge address echoed back)
# from filling a log file by itself.
MAX_LOG_LINE = 8192
# `stat` shows this many of the most recent warnings and errors ("last errors").
LAST_ERRORS = 10
# Lines logged before the log directory can be opened (between makeService and the start of
# the service, i.e. before the privilege drop) are kept in memory up to this many.
EARLY_BUFFER_LINES = 1000
# At shutdown, wait at most this long for the log writer thread to write what it was given.
WRITER_STOP_TIMEOUT = 10.0
# The running server flushes its log lines at most once per this many seconds: a line
# logged after a quiet spell is written at the end of its reactor turn, lines that follow
# within the interval wait for its end and go together. Flushing at the end of every turn
# meant a timer, a hand-over to the writer thread and that thread's two trips for the GIL per
# turn: 1,905 flushes for 4,000 messages at 20 SMTP sessions, 250 with the interval. Measured
# as 10 alternating pairs against the per-turn flush: median +6 % messages/s (0.75x-1.18x; the
# machine's noise is about that wide), median -3 % server CPU per message. The price: lines
# reach the file up to 20 ms later under load, and are lost if the process is killed in
# those 20 ms (multilog behind a pipe kept them).
FLUSH_INTERVAL = 0.02

# The TAI64 label of 1970-01-01 00:00:10 TAI (= 00:00:00 UTC): daemontools' tai64n.
_TAI64_BASE = 2 ** 62 + 10

# Namespace prefix -> area; the first matching prefix wins (so dnsbl is "dns", not "smtp").
AREAS: tuple[tuple[str, str], ...] = (
    ("mailappliance.access.dnsbl", "dns"),
    ("mailappliance.dns", "dns"),
    ("mailappliance.smtp", "smtp"),
    ("mailappliance.access", "smtp"),
    ("mailappliance.address", "smtp"),
    ("mailappliance.queue", "delivery"),
    ("mailappliance.delivery", "delivery"),
    ("mailappliance.sendmail", "delivery"),
    ("mailappliance.pop3", "pop3"),
    ("mailappliance.admin", "admin"),
    ("mailappliance.reload", "admin"),
)
DEFAULT_AREA = "server"
KNOWN_AREAS = frozenset(a for _, a in AREAS) | {DEFAULT_AREA}

# Event keys whose values are never written, whatever the format string says.
SECRET_KEYS = frozenset({"password", "passwd", "new_password", "secret", "token", "credentials",
                         "auth_data", "auth_payload", "response"})
REDACTED = "[redacted]"

# sd-daemon(3) priority prefixes for journald (SyslogLevelPrefix=yes is systemd's default).
_JOURNAL_PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4,
                     LogLevel.error: 3, LogLevel.critical: 2}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Twisted's own port lines ("SMTPFactory starting on 25", "(TCP Port 25 Closed)"), logged
# through its legacy log.msg whatever a factory's `noisy` says: the service logs its own
# "<kind>: listening on <address>" line instead, so the mail log leaves them out.
_CHATTER = re.compile(r"\A(?:.+ starting on \S.*|\((?:\w+ )?Port \S.* Closed\))\Z")


def is_chatter(event: dict) -> bool:
    """Twisted's port start/stop lines (see _CHATTER); factories and protocols of ours set
    `noisy = False` for the "Starting factory" ones."""
    if event.get("log_namespace") != "log_legacy":
        return False
    message = event.get("message")
    return (isinstance(message, tuple) and len(message) == 1 and isinstance(message[0], str)
            and _CHATTER.match(message[0]) is not None)


# --- pure formatting -------------------------------------------------------------------------

# namespace -> area, filled as namespaces are seen (a few dozen classes log; bounded anyway).
_AREA_CACHE: dict[str, str] = {}
AREA_CACHE_MAX = 1000


def area_of(event: dict) -> str:
    explicit = event.get("log_area")
    if explicit is not None and isinstance(explicit, str) and explicit in KNOWN_AREAS:
        return explicit
    namespace = event.get("log_namespace") or ""
    area = _AREA_CACHE.get(namespace)
    if area is None:
        area = _area_of_namespace(namespace)
        if len(_AREA_CACHE) < AREA_CACHE_MAX:
            _AREA_CACHE[namespace] = area
    return area


def _area_of_namespace(namespace: str) -> str:
    for prefix, area in AREAS:
        if namespace == prefix or namespace.startswith(prefix + "."):
            return area
    return DEFAULT_AREA


def _escape(match: re.Match) -> str:
    c = match.group(0)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, "\\x%02x" % ord(c))


def clean(text: str, limit: int = MAX_LOG_LINE) -> str:
    """One line: control characters escaped, length bounded."""
    text = _CONTROL.sub(_escape, text)
    if len(text) > limit:
        cut = len(text) - limit
        text = text[:limit] + f"...[{cut} more characters]"
    return text


def redact(event: dict) -> dict:
    """A copy of `event` without the values of secret-named keys."""
    if not SECRET_KEYS.intersection(event):
        return event
    return {k: (REDACTED if k in SECRET_KEYS else v) for k, v in event.items()}


# log_format -> its parsed pieces (literal text, or (name, spec, conversion) of a plain
# `{name}` field), or None when the format needs Twisted's generic path (`{f()}` calls,
# `{a.b}` / `{a[0]}` lookups, nested specs, positional fields, parse errors).  Our formats are
# a few dozen constant strings, so the cache stays small; it is bounded all the same, in case
# some code logs with formats built at run time.
_FORMAT_CACHE: dict[str, list | None] = {}
FORMAT_CACHE_MAX = 1000
_PLAIN_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_formatter = string.Formatter()


def _compile_format(fmt: str) -> list | None:
    parts: list = []
    try:
        for literal, name, spec, conversion in _formatter.parse(fmt):
            if literal:
                parts.append(literal)
            if name is None:
                continue
            if (not _PLAIN_FIELD.match(name) or (spec and "{" in spec)
                    or conversion not in (None, "s", "r", "a")):
                return None
            parts.append((name, spec or "", conversion))
    except ValueError:
        return None
    return parts


_CONVERT = {None: None, "s": str, "r": repr, "a": ascii}


def _format_fast(event: dict) -> str:
    """What twisted.logger.formatEvent returns, without its per-event parse of the format
    string: the same str.format semantics (format(value, spec) after the conversion) for
    formats of plain `{name}` fields; anything else, or any error, goes to formatEvent."""
    fmt = event.get("log_format")
    if type(fmt) is not str or "log_flattened" in event:
        return formatEvent(event)
    try:
        parts = _FORMAT_CACHE[fmt]
    except KeyError:
        parts = _compile_format(fmt)
        if len(_FORMAT_CACHE) < FORMAT_CACHE_MAX:
            _FORMAT_CACHE[fmt] = parts
    if parts is None:
        return formatEvent(event)
    try:
        out = []
        for part in parts:
            if type(part) is str:
                out.append(part)
            else:
                name, spec, conversion = part
                value = event[name]
                if conversion is not None:
                    value = _CONVERT[conversion](value)
                out.append(format(value, spec))
        return "".join(out)
    except Exception:
        return formatEvent(event)      # e.g. a missing key: Twisted's own error text


def event_text(event: dict) -> str:
    """The event's message (format string filled in, secrets redacted), failure appended."""
    event = redact(event)
    try:
        text = _format_fast(event)
    except Exception as e:  # a broken format string must not lose the event
        text = f"unformattable event {event.get('log_format')!r}: {e}"
    failure = event.get("log_failure")
    if failure is not None:
        why = _failure_summary(failure)
        text = f"{text}: {why}" if text else why
    return text


def _failure_summary(failure) -> str:
    try:
        return f"{failure.type.__name__}: {failure.getErrorMessage()}"
    except Exception:
        return "unknown failure"


def traceback_lines(event: dict) -> list[str]:
    failure = event.get("log_failure")
    if failure is None:
        return []
    try:
        return failure.getTraceback().rstrip("\n").splitlines()
    except Exception:
        return []


# (second, "YYYY-MM-DDTHH:MM:SS") of the last line: every line of one second shares it.
_last_second: tuple[int, str] = (-1, "")


def format_time(when: float) -> str:
    """ISO 8601 UTC with microseconds: sorts as text, greps by day or minute."""
    global _last_second
    when = float(when)
    secs = int(when)
    micros = int(round((when - secs) * 1_000_000))
    if micros >= 1_000_000:
        secs, micros = secs + 1, micros - 1_000_000
    cached = _last_second           # one read: another thread may replace it meanwhile
    if cached[0] == secs:
        prefix = cached[1]
    else:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _last_second = (secs, prefix)
    return f"{prefix}.{micros:06d}Z"


def tai64n(when: float) -> str:
    """daemontools' external TAI64N label for a UNIX time, e.g. @4000000065f1a2b3075bcd15."""
    secs = int(when)
    nanos = int((when - secs) * 1_000_000_000)
    return "@%016x%08x" % (_TAI64_BASE + secs, nanos)


def event_lines(event: dict) -> list[tuple[str, str]]:
    """(area, text) lines for one event: one line, plus the traceback of a logged failure
    (each of its lines prefixed `traceback:` in the same area, so grep by area keeps them)."""
    area = area_of(event)
    lines = [(area, clean(event_text(event)))]
    for tb in traceback_lines(event):
        lines.append((area, clean("traceback: " + tb)))
    return lines


# Delivery results that are problems even though the queue logs them at info level
# (qmail-send's "delivery N: deferral: ..." / "failure: ...").
PROBLEM_STATUSES = frozenset({"deferral", "failure"})


def is_error(event: dict) -> bool:
    """Warnings, errors, logged failures and failed or deferred deliveries: what `stat`
    shows as last errors and the journal shows beside the file log."""
    level = event.get("log_level")
    return level in (LogLevel.warn, LogLevel.error, LogLevel.critical) or (
        "log_failure" in event) or event.get("status") in PROBLEM_STATUSES


# --- the rotating file (multilog's job) ------------------------------------------------------

class RotatingLog:
    """`current` plus at most `keep - 1` rotated `@<tai64n>.s` files in one directory.

    Blocking file I/O (a write per line, an fsync per rotation), like Twisted's own file log
    observer and like multilog on the other end of a pipe. A failed write is counted in
    `write_errors` and never raised: logging must not take the server down.
    """

    CURRENT = "current"

    def __init__(self, directory: Path, rotate_bytes: int, keep: int,
                 clock: Callable[[], float] = time.time, file_mode: int = 0o640) -> None:
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.clock = clock
        self.file_mode = file_mode
        self.fd: int | None = None
        self.size = 0
        self.write_errors = 0
        self.rotations = 0

    @property
    def current(self) -> Path:
        return self.directory / self.CURRENT

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     self.file_mode)
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def configure(self, rotate_bytes: int, keep: int) -> None:
        """New limits (on reload); they apply from the next line on."""
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self._prune()

    def write_line(self, line: str) -> None:
        self.write_lines((line,))

    def write_lines(self, lines) -> None:
        """Append lines with as few write() calls as rotation allows: one per file.  Each line
        is cut to `rotate_bytes` and rotation happens before the line that would not fit, the
        same as writing the lines one by one."""
        rotate_bytes = self.rotate_bytes
        chunk: list[bytes] = []
        chunk_bytes = 0
        written = 0              # lines of `lines` known to be on disk
        try:
            if self.fd is None:
                self.open()
            for line in lines:
                data = (line + "\n").encode("utf-8", "backslashreplace")
                if len(data) > rotate_bytes:
                    data = data[: rotate_bytes - 1] + b"\n"
                size = self.size + chunk_bytes
                if size > 0 and size + len(data) > rotate_bytes:
                    self._write_all(b"".join(chunk))
                    written += len(chunk)
                    chunk, chunk_bytes = [], 0
                    self.rotate()
                chunk.append(data)
                chunk_bytes += len(data)
            if chunk:
                self._write_all(b"".join(chunk))
        except OSError:
            self.write_errors += max(1, len(lines) - written)
            # Reopen next time: the directory may have been repaired (disk space freed).
            if self.fd is not None:
                try:
                    os.close(self.fd)
                except OSError:
                    pass
                self.fd = None

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)

    def rotate(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
        name = tai64n(self.clock()) + ".s"
        target = self.directory / name
        n = 0
        while target.exists():  # two rotations within one clock tick
            n += 1
            target = self.directory / f"{name[:-2]}.{n}.s"
        os.rename(self.current, target)
        self.rotations += 1
        self._prune()
        self.open()
        _fsync_dir(self.directory)

    def old_files(self) -> list[Path]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [self.directory / n for n in sorted(n for n in names
                                                  if n.startswith("@") and n.endswith(".s"))]

    def _prune(self) -> None:
        old = self.old_files()
        excess = len(old) - (self.keep - 1)
        for path in old[:max(0, excess)]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- observers -------------------------------------------------------------------------------

@implementer(ILogObserver)
class FileLogObserver:
    """Writes events to a RotatingLog; until `start()`, lines wait in a bounded buffer.

    Without a reactor every line is written at once.  With one (the running server), lines
    are written by a flush scheduled with ``callLater`` (``callFromThread`` for an event
    logged in another thread): at the end of the reactor turn when the last flush is more
    than FLUSH_INTERVAL (20 ms) ago, else when that interval ends.  So a quiet server's line
    reaches the file at once, and a busy one makes one write() per 20 ms instead of one per
    line (which under load was about a tenth of the reactor thread's time) and one timer and
    hand-over per 20 ms instead of one per turn.
    The running server also gives the writes to a thread of their own (`writer_thread`,
    see `flush`), so the reactor thread never waits for the log file.  `stop()` writes what
    is pending first.
    The price: if the process dies abruptly (SIGKILL, power loss), the lines of its last
    turn or 20 ms (and those the writer thread had not written yet) can be lost -- never
    anything the queue promises (those are fsynced by the queue itself).
    """

    def __init__(self, log: RotatingLog, last_errors: Deque[str] | None = None,
                 reactor=None, writer_thread: bool = False) -> None:
        self.log = log
        # With writer_thread, each turn's lines go to a thread of their own that makes the
        # write() calls, so the reactor never waits for the log file (see `flush`).
        self.writer_thread = writer_thread
        self._writer: threading.Thread | None = None
        self._to_writer: "queue.SimpleQueue[list[str] | None]" = queue.SimpleQueue()
        self.last_errors = last_errors if last_errors is not None else collections.deque(
            maxlen=LAST_ERRORS)
        self.started = False
        self.early: Deque[str] = collections.deque(maxlen=EARLY_BUFFER_LINES)
        self.early_dropped = 0
        self._early_events: Deque[dict] = collections.deque(maxlen=EARLY_BUFFER_LINES)
        self.reactor = reactor
        # Lines waiting for the flush (deque: append and popleft are safe across threads).
        self.pending: Deque[str] = collections.deque()
        self._flush_scheduled = False
        self._last_flush: float | None = None      # reactor time of the last flush that wrote
        self._io_thread = threading.get_ident()

    def __call__(self, event: dict) -> None:
        try:
            if is_chatter(event):
                return
            if not self.started:
                # twistd replays the events it buffered before its logging began: an event
                # seen before start is written once.
                if any(e is event for e in self._early_events):
                    return
                self._early_events.append(event)
            when = format_time(event.get("log_time") or time.time())
            lines = [f"{when} {area}: {text}" for area, text in event_lines(event)]
            if is_error(event):
                self.last_errors.append(lines[0])
            if self.started and self.reactor is not None:
                self.pending.extend(lines)
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    try:
                        if threading.get_ident() == self._io_thread:
                            self.reactor.callLater(self._flush_delay(), self.flush)
                        else:
                            self.reactor.callFromThread(self.flush)
                    except Exception:
                        self.flush()      # no way to defer it: write now
                return
            for line in lines:
                if self.started:
                    self.log.write_line(line)
                else:
                    if len(self.early) == self.early.maxlen:
                        self.early_dropped += 1
                    self.early.append(line)
        except Exception:
            # An observer that raises is reported to every other observer, this one included;
            # never let a log line become a loop or a crash.
            self.log.write_errors += 1

    def _flush_delay(self) -> float:
        if self._last_flush is None:
            return 0.0
        # Bounded both ways: the reactor's clock is the wall clock, which may be stepped back.
        return min(FLUSH_INTERVAL,
                   max(0.0, self._last_flush + FLUSH_INTERVAL - self.reactor.seconds()))

    def flush(self) -> None:
        """Write the pending lines (one write per log file touched), or with a writer thread
        hand them to it.

        Why a thread: a write() that extends a file on ext4 needs a journal handle, and
        while the journal commits (which every fsync of the queue and the Maildirs makes it
        do, hundreds of times a second under load) a new handle waits. Written from the
        reactor thread, the log then stalled every session for the length of a commit:
        py-spy under the DNSBL benchmark found the reactor thread in the log's write() 13 %
        of the time. The queue of lines between the two threads is unbounded only in
        principle: the reactor produces lines no faster than it does the work they report."""
        # Cleared first: a line appended while we drain schedules a flush of its own.
        self._flush_scheduled = False
        pending = self.pending
        if not pending:
            return
        lines = [pending.popleft() for _ in range(len(pending))]
        if self.reactor is not None:
            self._last_flush = self.reactor.seconds()
        if self._writer is not None:
            self._to_writer.put(lines)
            return
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            self.log.write_lines(lines)
        except Exception:
            self.log.write_errors += 1

    def _writer_loop(self) -> None:
        """Write what the reactor hands over, everything already queued in one write, until
        the None that `stop` sends."""
        stopping = False
        while not stopping:
            lines: list[str] = []
            item = self._to_writer.get()
            while item is not None:
                lines.extend(item)
                try:
                    item = self._to_writer.get_nowait()
                except queue.Empty:
                    break
            stopping = item is None
            if lines:
                self._write(lines)

    def start(self) -> None:
        self.started = True
        self._early_events.clear()
        self._io_thread = threading.get_ident()
        if self.early_dropped:
            self.log.write_line(f"{format_time(time.time())} {DEFAULT_AREA}: "
                                f"{self.early_dropped} early log lines dropped")
        while self.early:
            self.log.write_line(self.early.popleft())
        if self.writer_thread and self.reactor is not None and self._writer is None:
            self._writer = threading.Thread(target=self._writer_loop, name="mail log writer",
                                            daemon=True)
            self._writer.start()

    def stop(self) -> None:
        self.flush()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._to_writer.put(None)
            writer.join(WRITER_STOP_TIMEOUT)
        self.started = False
        if writer is None or not writer.is_alive():
            self.log.close()        # else the stuck writer still owns the file: leave it


# True while a FileLogObserver of a running server writes the mail log (see module docstring).
_files_active = False


@implementer(ILogObserver)
class JournalObserver:
    """``<priority>area: text`` lines on a stream, for journald via ``twistd -n``."""

    def __init__(self, stream: TextIO | None = None,
                 files_active: Callable[[], bool] = lambda: _files_active) -> None:
        self.stream = stream
        self.files_active = files_active

    def __call__(self, event: dict) -> None:
        try:
            if is_chatter(event):
                return
            stream = self.stream or sys.stdout
            area = area_of(event)
            if self.files_active() and area != DEFAULT_AREA and not is_error(event):
                return
            level = event.get("log_level", LogLevel.info)
            prio = _JOURNAL_PRIORITY.get(level, 6)
            if "log_failure" in event:
                prio = min(prio, 3)
            out = [f"<{prio}>{a}: {t}\n" for a, t in event_lines(event)]
            stream.write("".join(out))
            stream.flush()
        except Exception:
            pass


def journal() -> JournalObserver:
    """Log observer factory for ``twistd --logger=mailappliance.logging.journal``.

    twistd replaces sys.stdout with a file that turns writes into log events once logging
    begins; the observer keeps the process's real standard output."""
    return JournalObserver(sys.__stdout__)


# --- the service ------------------------------------------------------------------------------

def _keeps_to_health(event: dict) -> bool:
    """While the files hold the mail log, what standard output still shows: warnings,
    errors, failed or deferred deliveries, and ``server`` events (start, listen, stop)."""
    return not _files_active or area_of(event) == DEFAULT_AREA or is_error(event)


@implementer(ILogObserver)
class HealthOnly:
    """Wraps twistd's own standard-output observer while the file log runs (see
    LoggingService): the same lines as before for the events it passes, none for the rest."""

    def __init__(self, inner, keep: Callable[[dict], bool] = _keeps_to_health) -> None:
        self.inner = inner
        self.keep = keep

    def __call__(self, event: dict) -> None:
        if self.keep(event):
            self.inner(event)


def _writes_to(observer, stream) -> bool:
    """Is `observer` a twisted.logger.FileLogObserver writing to `stream` (twistd's default
    observer under ``twistd -n`` writes to the process's standard output)?"""
    from twisted.logger import FileLogObserver as TwistedFileLogObserver
    if type(observer) is not TwistedFileLogObserver:
        return False
    out = getattr(observer, "_outFile", None)
    if out is None or stream is None:
        return False
    if out is stream:
        return True
    try:
        return out.fileno() == stream.fileno()
    except Exception:
        return False


class LoggingService(service.Service):
    """Attaches the file observer to Twisted's global log publisher for the server's lifetime.

    The observer is attached at construction (so the listening lines of privilegedStartService
    are kept) and the files are opened in startService, after twistd has dropped privileges,
    so the log files belong to the user the server runs as.

    Under ``twistd -n`` without ``--logger``, twistd's own observer writes every event to
    standard output as well: a second copy of the mail log, formatted by Twisted's generic
    code and flushed per event, which under load cost the reactor thread several times what
    the file log does.  While the files are written, that observer is wrapped so standard
    output keeps what ``--logger=mailappliance.logging.journal`` keeps (warnings, errors,
    failed or deferred deliveries, ``server`` events) in twistd's format; stopService puts it
    back.  A twistd log file (daemon mode, ``--logfile``) is left alone.
    """

    def __init__(self, settings, publisher=globalLogPublisher,
                 last_errors: Deque[str] | None = None, clock: Callable[[], float] = time.time,
                 reactor=None, stdout=None):
        self.settings = settings
        self.publisher = publisher
        self.stdout = stdout if stdout is not None else sys.__stdout__
        self._wrapped: list[HealthOnly] = []
        self.file_log = RotatingLog(settings.log_directory, settings.log.rotate_bytes,
                                    settings.log.keep, clock=clock)
        # With a reactor, lines are written once per reactor turn (see FileLogObserver).
        self.observer = FileLogObserver(self.file_log, last_errors, reactor=reactor,
                                        writer_thread=True)
        self.publisher.addObserver(self.observer)

    def startService(self) -> None:
        global _files_active
        super().startService()
        from mailappliance.privileges import adopt_for_data
        self.file_log.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        adopt_for_data(self.settings.data, self.file_log.directory)
        self.observer.start()
        _files_active = True
        self._wrap_stdout_copies()

    def stopService(self) -> None:
        global _files_active
        super().stopService()
        self._unwrap_stdout_copies()
        _files_active = False
        self.publisher.removeObserver(self.observer)
        self.observer.stop()

    def _wrap_stdout_copies(self) -> None:
        # LogPublisher has no public list of its observers; without one (another Twisted),
        # nothing is wrapped and standard output keeps the full copy.
        observers = list(getattr(self.publisher, "_observers", None) or ())
        for obs in observers:
            if _writes_to(obs, self.stdout):
                wrapper = HealthOnly(obs)
                self.publisher.addObserver(wrapper)
                self.publisher.removeObserver(obs)
                self._wrapped.append(wrapper)

    def _unwrap_stdout_copies(self) -> None:
        wrapped, self._wrapped = self._wrapped, []
        for wrapper in wrapped:
            self.publisher.addObserver(wrapper.inner)
            self.publisher.removeObserver(wrapper)

    def reload(self, settings) -> None:
        self.settings = settings
        self.file_log.configure(settings.log.rotate_bytes, settings.log.keep)


@implementer(ILogObserver)
class ErrorRing:
    """Only remembers the last warnings/errors (for `stat`) when no file log runs."""

    def __init__(self, last_errors: Deque[str]) -> None:
        self.last_errors = last_errors

    def __call__(self, event: dict) -> None:
        try:
            if is_error(event):
                when = format_time(event.get("log_time") or time.time())
                area, text = event_lines(event)[0]
                self.last_errors.append(f"{when} {area}: {text}")
        except Exception:
            pass


class _ErrorRingService(service.Service):
    def __init__(self, observer: ErrorRing, publisher=globalLogPublisher) -> None:
        self.observer = observer
        self.publisher = publisher
        publisher.addObserver(observer)

    def stopService(self) -> None:
        super().stopService()
        self.publisher.removeObserver(self.observer)


def build_service(settings, reactor, stats: dict) -> tuple[service.Service,
                                                        Callable[[object], None] | None]:
    """make_service's logging part, built before every other: (the file log service, its
    reload hook) or, with [log] stdout, (the error ring only, None). The last errors for
    `stat` are kept in stats["last_errors"]."""
    last_errors = stats.setdefault("last_errors", collections.deque(maxlen=LAST_ERRORS))
    if settings.log.stdout:
        return _ErrorRingService(ErrorRing(last_errors)), None
    svc = LoggingService(settings, last_errors=last_errors, reactor=reactor)
    return svc, svc.reload


def iter_log_files(directory: Path) -> Iterable[Path]:
    """Rotated files oldest first, then `current` (for tests and tools)."""
    log = RotatingLog(directory, 4096, 2)
    yield from log.old_files()
    if log.current.exists():
        yield log.current
