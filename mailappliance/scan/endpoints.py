"""`[scan] clamd` and `[scan] spam` texts: which client, which Twisted endpoint. Pure.

Twisted's client endpoint syntax ("unix:/run/clamav/clamd.ctl", "tcp:127.0.0.1:3310"); a bare
absolute path means a unix socket. For `spam`, a "rspamd:" prefix is optional; "spamd:" names
SpamAssassin's spamd, whose client is not written yet (docs/SCANNING.md says how it would be).
"""

from __future__ import annotations

SCORERS = ("rspamd",)
# Scorers whose protocol is planned but not implemented (DESIGN.md names both).
PLANNED_SCORERS = ("spamd",)
# Client endpoint types that make sense for a local scanning daemon.
CLIENT_TYPES = ("unix", "tcp", "tcp6")


def endpoint_description(text: str) -> str:
    """Twisted client endpoint syntax for an operator's `[scan]` endpoint text."""
    text = text.strip()
    if text.startswith("/"):
        return "unix:" + text.replace("\\", "\\\\").replace(":", "\\:")
    return text


def split_scorer(text: str) -> tuple[str, str]:
    """`[scan] spam` text -> (scorer kind, endpoint text); ValueError for a scorer we have no
    client for. "rspamd:unix:/run/rspamd/normal.sock" and "unix:/run/rspamd/normal.sock"
    are the same."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if sep and kind in SCORERS + PLANNED_SCORERS:
        if kind in PLANNED_SCORERS:
            raise ValueError(f"spam scorer {kind!r} is not implemented; use rspamd")
        return kind, rest
    return "rspamd", text


def check_endpoint(text: str) -> str | None:
    """Why `text` cannot name a scanner's endpoint, or None if it can."""
    from twisted.internet.endpoints import clientFromString    # parses; touches no reactor
    description = endpoint_description(text)
    kind = description.split(":", 1)[0]
    if kind not in CLIENT_TYPES:
        return f"unknown endpoint type {kind!r} (use unix:, tcp: or a socket path)"
    try:
        clientFromString(object(), description)
    except Exception as e:                 # Twisted raises ValueError/TypeError/KeyError
        return f"bad endpoint {text!r}: {e}"
    return None
