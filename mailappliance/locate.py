"""Which instance a command is about: the `mailappliance` command and `mailappliance-sendmail`
find it as an operator expects, and never invent one.

The order (the first that is given wins):

1. ``--config FILE``;
2. ``--data DIR``;
3. the environment variable ``MAILAPPLIANCE_CONFIG`` (a configuration file);
4. ``/etc/mailappliance/mailappliance.toml`` when that file exists (or exists but this user
   may not read it: the sendmail command then uses the inject socket);
5. ``./var`` of the current directory.

Only the commands that set an instance up (``domain add``, ``user add``, ``alias add``,
``import qmail``) may create a data directory. Every other command, and above all
``sendmail``, refuses with one line naming what it looked for when the data directory it found
holds no instance, so a message is never written where no server reads it (a program run by
cron in its own directory used to queue into that directory's ``./var``).

A data directory holds an instance when one of the files a server or the store commands create
there exists (``users.sqlite``, ``queue/``, ``run/``); a directory this user may not look into
counts as "unknown", not as "no instance" (an admin group member, a web application: they
reach the server through its sockets).

No Twisted, no settings: pure path logic plus `os.stat`, so both console scripts use it before
anything else.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

SYSTEM_CONFIG = Path("/etc/mailappliance/mailappliance.toml")
ENV_CONFIG = "MAILAPPLIANCE_CONFIG"
ENV_INJECT = "MAILAPPLIANCE_INJECT"
# Where the production configuration (conf/mailappliance.toml) puts [listen] inject; the
# sendmail command uses it when it cannot read the configuration.
DEFAULT_INJECT_SOCKET = "/run/mailappliance/inject.sock"
# Files whose presence marks a data directory as an instance (the user store, the queue, the
# server's run directory).
MARKERS = ("users.sqlite", "queue", "run")
# What the refusal names, in the order it looks.
LOOKED_FOR = (f"--config, --data, {ENV_CONFIG}, {SYSTEM_CONFIG}, ./var")

YES, NO, UNKNOWN = "yes", "no", "unknown"


class NoInstance(Exception):
    """No instance where the command looked; str() is the one line for stderr."""


@dataclass(frozen=True)
class Found:
    """Where the instance is: a configuration file, a data directory (--data, ./var), or both
    (the sendmail command takes --data with --config as an override). `how` names the source
    for messages ("--config /x.toml", "MAILAPPLIANCE_CONFIG=/x.toml", "./var")."""

    config: Path | None
    data: Path | None
    how: str


def _exists(path: Path) -> bool:
    """True when `path` exists, or may exist but this user cannot look (EACCES)."""
    try:
        os.stat(path)
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def instance_state(data: Path) -> str:
    """YES (an instance is there), NO (definitely not: missing or empty of markers), or
    UNKNOWN (this user may not look into the directory)."""
    try:
        names = set(os.listdir(data))
    except FileNotFoundError:
        return NO
    except NotADirectoryError:
        return NO
    except PermissionError:
        return UNKNOWN
    except OSError as e:
        return UNKNOWN if e.errno == errno.EACCES else NO
    return YES if names.intersection(MARKERS) else NO


def locate(config: str | os.PathLike | None, data: str | os.PathLike | None, *,
           environ: Mapping[str, str] | None = None, cwd: Path | None = None,
           may_create: bool = False, system_config: Path = SYSTEM_CONFIG) -> Found:
    """The instance to use, by the order above. Without anything given and no ./var instance
    (unless `may_create`), NoInstance."""
    environ = os.environ if environ is None else environ
    cwd = cwd or Path.cwd()
    if config:
        return Found(_absolute(config, cwd), _absolute(data, cwd) if data else None,
                     f"--config {config}")
    if data:
        return Found(None, _absolute(data, cwd), f"--data {data}")
    env = environ.get(ENV_CONFIG, "")
    if env:
        return Found(_absolute(env, cwd), None, f"{ENV_CONFIG}={env}")
    if _exists(system_config):
        return Found(system_config, None, str(system_config))
    var = cwd / "var"
    if may_create or instance_state(var) != NO:
        return Found(None, var, "./var")
    raise NoInstance(f"no mailappliance instance found: looked for {LOOKED_FOR} "
                     f"(no instance in {var})")


def require_instance(data: Path, found: Found) -> None:
    """NoInstance unless `data` holds an instance (or this user cannot tell)."""
    if instance_state(data) == NO:
        if found.how == "./var":
            raise NoInstance(f"no mailappliance instance found: looked for {LOOKED_FOR} "
                             f"(no instance in {data})")
        raise NoInstance(f"no mailappliance instance in {data} (from {found.how}); "
                         f"looked for {LOOKED_FOR}")


def _absolute(path, cwd: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else cwd / p
