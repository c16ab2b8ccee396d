"""The configuration file to review, from qmail's control files (a pure core).

    control/me                      hostname
    vpopmail etc/defaultdomain      default_domain   (else control/defaultdomain)
    control/databytes               [smtp] databytes (0, qmail's "no limit", keeps the default)
    control/timeoutsmtpd            [smtp] timeout
    tcp.smtp                        [smtp] rules     (the checked copy)
    control/concurrencylocal/remote [queue] concurrency_local / concurrency_remote
    control/queuelifetime           [queue] lifetime_days (seconds rounded up to days)
    control/timeoutconnect/remote   [queue] connect_timeout / reply_timeout
    control/smtproutes              [routes]
    control/rcpthosts, locals,      the domains themselves (the user store), checked by
    virtualdomains, users/assign    source.py
"""

from __future__ import annotations

import json
from pathlib import Path

from mailappliance.migrate.qmailfiles import Note
from mailappliance.migrate.source import ControlValues

SECONDS_PER_DAY = 86400
# config.py's bounds, so the file loads as written.
CONCURRENCY_MAX = 1000


def _q(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for these characters)."""
    return json.dumps(value, ensure_ascii=False)


def _kv(key: str, value: str, comment: str = "") -> str:
    text = f"{key} = {value}"
    return f"{text:<44}# {comment}" if comment else text


def render(control: ControlValues, data: Path, rules_copy: Path | None,
           domains: list[str]) -> tuple[str, list[Note]]:
    notes: list[Note] = []
    lines = ["# Written by `mailappliance import qmail` from the qmail and vpopmail files;",
             "# review it, then install it as the server's configuration (docs/MIGRATION.md).",
             ""]
    if control.me:
        lines.append(_kv("hostname", _q(control.me), "control/me"))
    lines.append(f"data = {_q(str(data))}")
    dd = control.default_domain
    if dd:
        if dd in domains:
            lines.append(_kv("default_domain", _q(dd), control.default_domain_source))
        else:
            notes.append(Note("skipped", control.default_domain_source,
                              f"default domain {dd} is not an imported domain: "
                              "default_domain left out (logins must then name their domain)"))
    lines += ["",
              "[listen]                                    # qmail's ports (default: 127.0.0.1)",
              'smtp = ["tcp:25"]',
              'submission = ["tcp:587"]',
              'pop3 = ["tcp:110"]',
              "",
              "[smtp]"]
    if rules_copy is not None:
        lines.append(f"rules = {_q(str(rules_copy))}")
    if control.databytes:
        lines.append(_kv("databytes", str(control.databytes), "control/databytes"))
    elif control.databytes == 0:
        notes.append(Note("info", f"{control.control_dir}/databytes", "0 (no limit in qmail): "
                          "mailappliance keeps its default databytes = 10485760"))
    if control.timeoutsmtpd:
        lines.append(_kv("timeout", str(control.timeoutsmtpd), "control/timeoutsmtpd"))
    lines += ["", "[queue]"]
    for key, value, name in (("concurrency_local", control.concurrency_local, "concurrencylocal"),
                             ("concurrency_remote", control.concurrency_remote,
                              "concurrencyremote")):
        if value is None:
            continue
        clamped = min(max(value, 1), CONCURRENCY_MAX)
        if clamped != value:
            notes.append(Note("warning", f"{control.control_dir}/{name}", f"{value} is outside 1..."
                              f"{CONCURRENCY_MAX}: {key} = {clamped}"))
        lines.append(_kv(key, str(clamped), f"control/{name}"))
    if control.queuelifetime is not None:
        days = max(1, -(-control.queuelifetime // SECONDS_PER_DAY))
        if days * SECONDS_PER_DAY != control.queuelifetime:
            notes.append(Note("warning", f"{control.control_dir}/queuelifetime",
                              f"{control.queuelifetime} seconds: lifetime_days = {days} "
                              "(mailappliance counts whole days)"))
        lines.append(_kv("lifetime_days", str(days), "control/queuelifetime"))
    if control.timeoutconnect:
        lines.append(_kv("connect_timeout", str(control.timeoutconnect), "control/timeoutconnect"))
    if control.timeoutremote:
        lines.append(_kv("reply_timeout", str(control.timeoutremote), "control/timeoutremote"))
    lines += _routes(control, notes)
    if control.servercert is not None:
        lines += ["", f"# qmail's TLS certificate and key ({control.servercert}); copy them",
                  "# where the server's user can read them, then uncomment:",
                  "# [tls]",
                  f"# cert = {_q(str(control.servercert))}",
                  f"# key = {_q(str(control.servercert))}"]
    return "\n".join(lines) + "\n", notes


def _routes(control: ControlValues, notes: list[Note]) -> list[str]:
    if not control.routes:
        return []
    out = ["", f"{'[routes]':<44}# control/smtproutes"]
    seen: set[str] = set()
    default = next((r for r in control.routes if r.domain == ""), None)
    subdomain_note = False
    for r in control.routes:
        where = f"{control.routes_source}:{r.line}"
        domain = r.domain
        if not r.host:
            if default is not None and domain:
                notes.append(Note("skipped", where, f"'{domain}:' (deliver to its MX, not the "
                                  "default relay) cannot be said in [routes]: mail for it "
                                  f"goes to {default.host}"))
            continue
        if domain.startswith("."):
            domain = domain[1:]
            notes.append(Note("warning", where, f"route for subdomains of {domain} also "
                              f"applies to {domain} itself in mailappliance"))
        elif domain and not subdomain_note:
            subdomain_note = True
            notes.append(Note("info", where, "a route for a domain also applies to its "
                              "subdomains in mailappliance (qmail: that domain only)"))
        if domain in seen:
            notes.append(Note("skipped", where, f"second route for {domain or 'everything else'}"
                              ": qmail used the first"))
            continue
        seen.add(domain)
        target = r.host if r.port == 25 else f"{r.host}:{r.port}"
        if ":" in r.host and r.port != 25:
            target = f"[{r.host}]:{r.port}"
        out.append(f"{_q(domain)} = {_q(target)}")
    return out
