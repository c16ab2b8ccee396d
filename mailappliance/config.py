"""Configuration: one TOML file plus command-line overrides -> one immutable Settings tree.

A pure core: it reads the files it is pointed at (config, rules, TLS paths' existence) and
nothing else. Every problem is a ConfigError whose str() is one line naming the file, the key or
line, and what is wrong, so twistd can print it and stop without a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mailappliance.access.rules import Rules, RulesError, parse_rules


class ConfigError(Exception):
    """A configuration problem; str(error) is the one line shown to the operator."""


# --- the settings tree ------------------------------------------------------------------------

@dataclass(frozen=True)
class ListenSettings:
    smtp: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    submission: tuple[str, ...] = ("tcp:2587:interface=127.0.0.1",)
    # Implicit-TLS submission (RFC 8314, port 465); off unless configured.
    submissions: tuple[str, ...] = ()
    pop3: tuple[str, ...] = ("tcp:2110:interface=127.0.0.1",)
    pop3s: tuple[str, ...] = ()
    admin: tuple[str, ...] = ("unix:var/admin.sock",)


@dataclass(frozen=True)
class TLSSettings:
    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class SMTPSettings:
    rules: Path | None = None
    max_connections: int = 40          # tcpserver -c default
    max_per_ip: int = 10
    databytes: int = 10485760          # qmail control/databytes
    max_recipients: int = 100          # RFC 5321 4.5.3.1.8: at least 100 must be accepted
    timeout: int = 1200                # qmail-smtpd control/timeoutsmtpd
    max_errors: int = 20
    dnsbl: tuple[str, ...] = ()
    dnsbl_allow: tuple[str, ...] = ()
    dnsbl_timeout: int = 60            # rblsmtpd -t
    dnsbl_permanent: bool = False      # rblsmtpd -b: 553 instead of 451
    dnsbl_fail_closed: bool = False    # rblsmtpd -C: 451 when the lookup fails
    auth: bool = False                 # offer AUTH on port 25 (off: submission only)


@dataclass(frozen=True)
class SubmissionSettings:
    auth_plaintext_loopback: bool = False   # allow AUTH without TLS from 127.0.0.0/8 and ::1
    sender_binding: bool = True             # MAIL FROM and From: must belong to the user


@dataclass(frozen=True)
class POP3Settings:
    roaming_relay_minutes: int = 30
    timeout: int = 600                 # RFC 1939 section 3: at least 10 minutes
    require_tls: bool = False          # refuse USER/PASS before STLS on the plain port


@dataclass(frozen=True)
class QueueSettings:
    concurrency_local: int = 10        # qmail control/concurrencylocal
    concurrency_remote: int = 20       # qmail control/concurrencyremote
    lifetime_days: int = 7             # qmail control/queuelifetime (604800 s)
    connect_timeout: int = 60          # qmail control/timeoutconnect
    reply_timeout: int = 1200          # qmail control/timeoutremote


@dataclass(frozen=True)
class Route:
    domain: str                        # "" = every other domain
    host: str
    port: int = 25


@dataclass(frozen=True)
class DNSSettings:
    nameservers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class LogSettings:
    rotate_bytes: int = 1000000        # multilog s1000000
    keep: int = 10                     # multilog n10
    directory: Path | None = None      # default: <data>/log
    stdout: bool = False               # log to stdout (journal) instead of files


@dataclass(frozen=True)
class AdminSettings:
    socket_mode: int = 0o600
    socket_group: str | None = None
    token_file: Path | None = None     # required for a TCP admin endpoint


@dataclass(frozen=True)
class Settings:
    hostname: str
    data: Path
    default_domain: str | None = None
    bcrypt_cost: int = 12
    config_path: Path | None = None
    listen: ListenSettings = field(default_factory=ListenSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    smtp: SMTPSettings = field(default_factory=SMTPSettings)
    submission: SubmissionSettings = field(default_factory=SubmissionSettings)
    pop3: POP3Settings = field(default_factory=POP3Settings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    routes: tuple[Route, ...] = ()
    dns: DNSSettings = field(default_factory=DNSSettings)
    log: LogSettings = field(default_factory=LogSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    rules: Rules | None = None
    # How these settings were made, so a reload (SIGHUP, `mailappliance reload`) can apply the
    # same command-line overrides, relative to the same directory, to the re-read file.
    cli_overrides: tuple[tuple[str, Any], ...] = ()
    cwd: Path | None = None

    @property
    def log_directory(self) -> Path:
        return self.log.directory or (self.data / "log")

    def route_for(self, domain: str) -> Route | None:
        """qmail smtproutes: exact domain first, then parent domains, then the "" route."""
        domain = domain.lower().rstrip(".")
        table = {r.domain: r for r in self.routes}
        parts = domain.split(".")
        for i in range(len(parts)):
            hit = table.get(".".join(parts[i:]))
            if hit is not None:
                return hit
        return table.get("")


# --- the schema -------------------------------------------------------------------------------
# Each key: (python type name, converter).  The schema is data so the error texts stay uniform.

_INT, _BOOL, _STR, _PATH, _STRLIST, _ENDPOINTS, _HOSTPORTS = (
    "integer", "boolean", "string", "path", "list of strings", "list of endpoints",
    "list of host:port strings")

_SCHEMA: dict[str, Any] = {
    "hostname": _STR,
    "data": _PATH,
    "default_domain": _STR,
    "bcrypt_cost": _INT,
    "listen": {k: _ENDPOINTS for k in
               ("smtp", "submission", "submissions", "pop3", "pop3s", "admin")},
    "tls": {"cert": _PATH, "key": _PATH},
    "smtp": {"rules": _PATH, "max_connections": _INT, "max_per_ip": _INT, "databytes": _INT,
             "max_recipients": _INT, "timeout": _INT, "max_errors": _INT,
             "dnsbl": _STRLIST, "dnsbl_allow": _STRLIST, "dnsbl_timeout": _INT,
             "dnsbl_permanent": _BOOL, "dnsbl_fail_closed": _BOOL, "auth": _BOOL},
    "submission": {"auth_plaintext_loopback": _BOOL, "sender_binding": _BOOL},
    "pop3": {"roaming_relay_minutes": _INT, "timeout": _INT, "require_tls": _BOOL},
    "queue": {"concurrency_local": _INT, "concurrency_remote": _INT, "lifetime_days": _INT,
              "connect_timeout": _INT, "reply_timeout": _INT},
    "routes": "routes",
    "dns": {"nameservers": _HOSTPORTS},
    "log": {"rotate_bytes": _INT, "keep": _INT, "directory": _PATH, "stdout": _BOOL},
    "admin": {"socket_mode": _INT, "socket_group": _STR, "token_file": _PATH},
}

# Lower bounds that keep the server alive: a zero limit would refuse everything forever.
_MINIMUM = {
    "bcrypt_cost": 4, "smtp.max_connections": 1, "smtp.max_per_ip": 1, "smtp.databytes": 1,
    "smtp.max_recipients": 1, "smtp.timeout": 1, "smtp.max_errors": 1, "smtp.dnsbl_timeout": 1,
    "pop3.roaming_relay_minutes": 0, "pop3.timeout": 600, "queue.concurrency_local": 1,
    "queue.concurrency_remote": 1, "queue.lifetime_days": 1, "queue.connect_timeout": 1,
    "queue.reply_timeout": 1, "log.rotate_bytes": 4096, "log.keep": 2,
}
_MAXIMUM = {"bcrypt_cost": 31, "queue.concurrency_local": 1000, "queue.concurrency_remote": 1000}

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")

ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl", "systemd"})


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def check_endpoint(text: str) -> str | None:
    """Return why `text` is not a usable server endpoint string, or None if it is."""
    from twisted.internet import endpoints

    if not isinstance(text, str) or not text.strip():
        return "empty endpoint"
    kind = text.split(":", 1)[0]
    if kind not in ENDPOINT_TYPES:
        return f"unknown endpoint type {kind!r} (use tcp:, tcp6:, unix:, ssl: or systemd:)"
    try:
        # Builds the endpoint object without listening; no reactor is touched.
        endpoints.serverFromString(object(), text)
    except Exception as e:  # twisted raises ValueError/TypeError/SSL errors here
        return f"bad endpoint {text!r}: {e}"
    if kind in ("tcp", "tcp6", "ssl"):
        port = text.split(":")[1].split("=")[0] if ":" in text else ""
        if port and not port.isdigit():
            return f"bad endpoint {text!r}: port must be a number"
    return None


def _error(file: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"{file}: {key}: {what}")


def _convert(file: str, key: str, kind: str, value: Any, base: Path) -> Any:
    if kind == _INT:
        if type(value) is not int:
            raise _error(file, key, f"expected integer, got {_type_name(value)}")
        low, high = _MINIMUM.get(key), _MAXIMUM.get(key)
        if low is not None and value < low:
            raise _error(file, key, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise _error(file, key, f"must be at most {high}, got {value}")
        return value
    if kind == _BOOL:
        if type(value) is not bool:
            raise _error(file, key, f"expected boolean, got {_type_name(value)}")
        return value
    if kind == _STR:
        if not isinstance(value, str):
            raise _error(file, key, f"expected string, got {_type_name(value)}")
        return value
    if kind == _PATH:
        if not isinstance(value, str) or not value or "\0" in value:
            raise _error(file, key, f"expected a path string, got {_type_name(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    if kind in (_STRLIST, _ENDPOINTS, _HOSTPORTS):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _error(file, key, f"expected {kind}, got {_type_name(value)}")
        if kind == _ENDPOINTS:
            for v in value:
                why = check_endpoint(v)
                if why:
                    raise _error(file, key, why)
        if kind == _HOSTPORTS:
            return tuple(_host_port(file, key, v, 53) for v in value)
        if kind == _STRLIST:
            for v in value:
                if not _HOSTNAME.match(v):
                    raise _error(file, key, f"{v!r} is not a DNS zone name")
        return tuple(value)
    raise AssertionError(kind)


def _host_port(file: str, key: str, text: str, default_port: int) -> tuple[str, int]:
    host, port = text, default_port
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), int(m.group(2) or default_port)
    elif text.count(":") == 1:
        host, p = text.split(":")
        if not p.isdigit():
            raise _error(file, key, f"bad port in {text!r}")
        port = int(p)
    if not host or not (_HOSTNAME.match(host) or _is_ip(host)):
        raise _error(file, key, f"bad host in {text!r}")
    if not 0 < port < 65536:
        raise _error(file, key, f"port out of range in {text!r}")
    return host, port


def _is_ip(text: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _walk(file: str, table: Mapping[str, Any], schema: Mapping[str, Any], prefix: str,
          base: Path, out: dict[str, Any]) -> None:
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        kind = schema.get(key)
        if kind is None:
            raise _error(file, dotted, "unknown key")
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise _error(file, dotted, f"expected table, got {_type_name(value)}")
            _walk(file, value, kind, dotted + ".", base, out)
        elif kind == "routes":
            if not isinstance(value, dict):
                raise _error(file, dotted, f"expected table, got {_type_name(value)}")
            routes = []
            for dom, target in value.items():
                k = f"routes.{dom!r}" if dom == "" else f"routes.{dom}"
                if dom and not _HOSTNAME.match(dom):
                    raise _error(file, k, "not a domain name")
                if not isinstance(target, str):
                    raise _error(file, k, f"expected \"host[:port]\", got {_type_name(target)}")
                host, port = _host_port(file, k, target, 25)
                routes.append(Route(dom.lower().rstrip("."), host, port))
            out["routes"] = tuple(routes)
        else:
            out[dotted] = _convert(file, dotted, kind, value, base)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None


def default_hostname() -> str:
    return socket.getfqdn() or "localhost"


def load_settings(config: str | os.PathLike[str] | None = None,
                  overrides: Mapping[str, Any] | None = None,
                  *, cwd: Path | None = None) -> Settings:
    """Build Settings from embedded defaults, the TOML file, then command-line overrides.

    `overrides` uses the dotted keys of the schema ("data", "hostname", "listen.smtp", ...), with
    values already in their final types (lists of endpoint strings, path strings).
    """
    cwd = cwd or Path.cwd()
    flat: dict[str, Any] = {}
    config_path = None
    if config is not None:
        config_path = Path(config)
        if not config_path.is_absolute():
            config_path = cwd / config_path
        table = _read_file(config_path)
        # Relative paths in the file are relative to the file's directory, not to wherever the
        # server happens to be started from.
        _walk(str(config_path), table, _SCHEMA, "", config_path.parent, flat)
    for key, value in (overrides or {}).items():
        kind = _lookup_schema(key)
        flat[key] = _convert("command line", key, kind, value, cwd)

    data = flat.pop("data", None) or (cwd / "var")
    data = Path(os.path.abspath(data))
    hostname = flat.pop("hostname", None) or default_hostname()
    where = str(config_path) if config_path else "command line"
    if not _HOSTNAME.match(hostname):
        raise _error(where, "hostname", f"{hostname!r} is not a host name")
    default_domain = flat.pop("default_domain", None)
    if default_domain is not None and not _HOSTNAME.match(default_domain):
        raise _error(where, "default_domain", f"{default_domain!r} is not a domain name")
    routes = flat.pop("routes", ())

    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in flat.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value

    listen_kw = sections.get("listen", {})
    if "admin" not in listen_kw:
        listen_kw["admin"] = (f"unix:{_escape_endpoint_path(data / 'admin.sock')}",)
    listen = ListenSettings(**listen_kw)
    tls = TLSSettings(**sections.get("tls", {}))
    smtp = SMTPSettings(**sections.get("smtp", {}))
    log = LogSettings(**sections.get("log", {}))
    if log.directory is not None:
        log = dataclasses.replace(log, directory=Path(os.path.abspath(log.directory)))

    # Files that must exist: a missing one stops start-up now, not at the first connection.
    if (tls.cert is None) != (tls.key is None):
        raise _error(where, "tls", "cert and key must be given together")
    for name in ("cert", "key"):
        p = getattr(tls, name)
        if p is not None and not p.is_file():
            raise _error(where, f"tls.{name}", f"file not found: {p}")
    if tls.cert is not None:
        _check_tls_files(where, tls.cert, tls.key)
    for kind in ("pop3s", "submissions"):
        if getattr(listen, kind) and not tls.enabled:
            raise _error(where, f"listen.{kind}", "needs a [tls] cert and key")
    if sections.get("pop3", {}).get("require_tls") and not tls.enabled:
        raise _error(where, "pop3.require_tls", "needs a [tls] cert and key (for STLS)")
    rules = None
    if smtp.rules is not None:
        rules = load_rules(smtp.rules)
    admin = AdminSettings(**sections.get("admin", {}))
    if admin.token_file is not None and not admin.token_file.is_file():
        raise _error(where, "admin.token_file", f"file not found: {admin.token_file}")
    for ep in listen.admin:
        if ep.startswith(("tcp:", "tcp6:", "ssl:")):
            if admin.token_file is None:
                raise _error(where, "listen.admin",
                             f"TCP admin endpoint {ep!r} needs admin.token_file")
            if not _loopback_endpoint(ep):
                raise _error(where, "listen.admin",
                             f"TCP admin endpoint {ep!r} must set interface=127.0.0.1 or ::1")

    return Settings(
        hostname=hostname.rstrip("."), data=data, default_domain=default_domain,
        bcrypt_cost=top.get("bcrypt_cost", 12), config_path=config_path,
        listen=listen, tls=tls, smtp=smtp,
        submission=SubmissionSettings(**sections.get("submission", {})),
        pop3=POP3Settings(**sections.get("pop3", {})),
        queue=QueueSettings(**sections.get("queue", {})),
        routes=routes, dns=DNSSettings(**sections.get("dns", {})), log=log, admin=admin,
        rules=rules, cli_overrides=tuple((k, v) for k, v in (overrides or {}).items()),
        cwd=cwd)


def load_rules(path: Path) -> Rules:
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read rules file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: rules file is not UTF-8 text") from None
    try:
        return parse_rules(text, str(path))
    except RulesError as e:
        raise ConfigError(str(e)) from None


def _check_tls_files(where: str, cert: Path, key: Path) -> None:
    from OpenSSL import crypto
    try:
        crypto.load_certificate(crypto.FILETYPE_PEM, cert.read_bytes())
    except Exception:
        raise _error(where, "tls.cert", f"{cert} is not a PEM certificate") from None
    try:
        crypto.load_privatekey(crypto.FILETYPE_PEM, key.read_bytes())
    except Exception:
        raise _error(where, "tls.key", f"{key} is not a PEM private key") from None


def _loopback_endpoint(ep: str) -> bool:
    m = re.search(r"(?:^|:)interface=([^:]+)", ep)
    if not m:
        return False
    iface = m.group(1).replace("\\", "")
    return iface.startswith("127.") or iface in ("::1", "localhost")


def _escape_endpoint_path(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


def _lookup_schema(dotted: str) -> Any:
    node: Any = _SCHEMA
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"command line: {dotted}: unknown option")
        node = node[part]
    return node
