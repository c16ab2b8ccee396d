"""Administrative changes made by the `mailappliance` command, written into the mail log.

The store commands (domain, user, alias) work on the user store directly, with or without a
running server, so the command logs its own changes: one line in the server's log file,
``<ISO time> admin: cli uid=0(root) sudo=alice: user add bob@example.com: ok`` (or
``...: refused: <why>``), the same form the server writes for commands on its admin socket.
The uid is the caller's real uid, read before the command switches to the data directory's
owner; ``sudo=`` names $SUDO_USER when root runs it through sudo (a hint, not a proof).

No Twisted here (the store commands load none). The line is appended with one write() to
``<log directory>/current`` (O_APPEND: it lands whole, between the server's lines); the
server's rotation may then start a little past `rotate_bytes`. Under ``[log] stdout`` there
are no files: the line goes to syslog (the journal), ident ``mailappliance``. Logging never
makes a command fail.
"""

from __future__ import annotations

import os
import pwd
import time

# A line is cut to this many characters (the server's MAX_LOG_LINE).
MAX_LINE = 8192


def caller() -> str:
    """``cli uid=N(name)`` plus ``sudo=NAME`` when run through sudo."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    who = f"cli uid={uid}({name})"
    sudo = os.environ.get("SUDO_USER")
    if uid == 0 and sudo:
        who += f" sudo={_clean(sudo)[:64]}"
    return who


def _clean(text: str) -> str:
    return "".join(c if " " <= c <= "~" or c > "\x9f" else "?" for c in text)


def iso_now(now: float | None = None) -> str:
    now = time.time() if now is None else now
    secs = int(now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + \
        ".%06dZ" % int((now - secs) * 1_000_000)


def record(settings, text: str) -> None:
    """Write ``admin: <text>`` into the instance's mail log (or syslog under [log] stdout)."""
    text = _clean(text)[:MAX_LINE]
    try:
        if settings.log.stdout:
            import syslog
            syslog.openlog("mailappliance", 0, syslog.LOG_MAIL)
            syslog.syslog(syslog.LOG_INFO, f"admin: {text}")
            return
        directory = settings.log_directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(directory / "current", os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                     os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, f"{iso_now()} admin: {text}\n".encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
