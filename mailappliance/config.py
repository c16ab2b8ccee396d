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


# --- the schema: each key declared once, on its settings field -------------------------------
# A key is a dataclass field made by setting(): its type (one of the kinds below, which are also
# the words of the error messages), its default, its limits and a one-line meaning. A section is a
# field made by section(). Validation (known keys, types, limits) and the configuration
# reference (docs/CONFIGURATION.md, reference()) are both derived from these declarations, so
# adding a key is adding one field.

INTEGER, BOOLEAN, STRING, PATH, STRINGS, ENDPOINTS, HOSTPORTS, ROUTES = (
    "integer", "boolean", "string", "path", "list of strings", "list of endpoints",
    "list of host:port strings", "table of domain = \"host[:port]\"")
NUMBER = "number"           # a TOML integer or float (finite)


# Path keys whose documented way of saying "the default" is "" (DESIGN.md 3: mailboxes = "").
EMPTY_MEANS_DEFAULT = frozenset({"mailboxes"})


def setting(kind: str, default: Any = dataclasses.MISSING, doc: str = "", *,
            minimum: int | None = None, maximum: int | None = None,
            shown: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A configuration key. `shown` is the default as the reference prints it, when the value
    is computed at load time (the data directory, the host name) rather than fixed. `choices`:
    the only values a string key may take."""
    meta = {"kind": kind, "doc": doc, "minimum": minimum, "maximum": maximum, "shown": shown,
            "choices": choices}
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    """A [table] of keys, declared by the dataclass `cls`."""
    return field(default_factory=cls, metadata={"section": cls, "doc": doc})


# --- the settings tree ------------------------------------------------------------------------

@dataclass(frozen=True)
class ListenSettings:
    smtp: tuple[str, ...] = setting(ENDPOINTS, ("tcp:2525:interface=127.0.0.1",),
                                    "SMTP (port 25): mail from other servers")
    submission: tuple[str, ...] = setting(ENDPOINTS, ("tcp:2587:interface=127.0.0.1",),
                                          "submission (port 587): AUTH after STARTTLS for users")
    # Implicit-TLS submission (RFC 8314, port 465); off unless configured.
    submissions: tuple[str, ...] = setting(ENDPOINTS, (),
                                           "submission over implicit TLS (port 465); needs [tls]")
    pop3: tuple[str, ...] = setting(ENDPOINTS, ("tcp:2110:interface=127.0.0.1",),
                                    "POP3 (port 110), STLS offered when [tls] is set")
    pop3s: tuple[str, ...] = setting(ENDPOINTS, (),
                                     "POP3 over implicit TLS (port 995); needs [tls]")
    admin: tuple[str, ...] = setting(ENDPOINTS, ("unix:var/admin.sock",),
                                     "admin protocol: a unix socket, or TCP on loopback with "
                                     "[admin] token_file", shown="unix:DATA/admin.sock")
    inject: tuple[str, ...] = setting(ENDPOINTS, (), "local injection for every local user "
                                      "(`mailappliance-sendmail`): unix sockets only, made mode "
                                      "0666; the caller's uid is recorded (docs/OPERATIONS.md)")
    metrics: tuple[str, ...] = setting(ENDPOINTS, (), "Prometheus text at /metrics "
                                       "(docs/MONITORING.md): loopback TCP (interface=127.0.0.1 "
                                       "or ::1) or unix sockets, unless [metrics] allow_public",
                                       shown="[] (off)")


@dataclass(frozen=True)
class TLSSettings:
    cert: Path | None = setting(PATH, None, "PEM certificate (chain); given together with key",
                                shown="none: no TLS")
    key: Path | None = setting(PATH, None, "PEM private key of cert")

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class SMTPSettings:
    rules: Path | None = setting(PATH, None, "tcprules-style file: who may connect and relay, "
                                 "DNSBL and greeting delay per client",
                                 shown="none: nobody relays")
    max_connections: int = setting(INTEGER, 40, "simultaneous SMTP connections (tcpserver -c)",
                                   minimum=1)
    max_per_ip: int = setting(INTEGER, 10, "simultaneous connections from one address",
                              minimum=1)
    databytes: int = setting(INTEGER, 10485760, "largest message in bytes (qmail databytes)",
                             minimum=1)
    # RFC 5321 4.5.3.1.8: at least 100 must be accepted
    max_recipients: int = setting(INTEGER, 100, "recipients per message", minimum=1)
    timeout: int = setting(INTEGER, 1200, "seconds of client silence before the server hangs up "
                           "(qmail timeoutsmtpd)", minimum=1)
    max_errors: int = setting(INTEGER, 20, "5xx replies in one session before it is closed",
                              minimum=1)
    dnsbl: tuple[str, ...] = setting(STRINGS, (),
                                     "DNSBL zones to look clients up in (rblsmtpd -r)")
    dnsbl_allow: tuple[str, ...] = setting(STRINGS, (), "allow-list zones: a client listed there "
                                           "skips the DNSBLs (rblsmtpd -a)")
    dnsbl_timeout: int = setting(INTEGER, 60, "seconds to wait for a DNSBL answer (rblsmtpd -t)",
                                 minimum=1)
    dnsbl_permanent: bool = setting(BOOLEAN, False, "a listed client gets 553 instead of 451 "
                                    "(rblsmtpd -b)")
    dnsbl_fail_closed: bool = setting(BOOLEAN, False, "a failed DNSBL lookup gives 451 "
                                      "instead of letting the client in (rblsmtpd -c)")
    auth: bool = setting(BOOLEAN, False, "offer AUTH on the SMTP port too (off: submission only)")


@dataclass(frozen=True)
class SubmissionSettings:
    auth_plaintext_loopback: bool = setting(BOOLEAN, False, "allow AUTH without TLS from "
                                            "127.0.0.0/8 and ::1")
    sender_binding: bool = setting(BOOLEAN, True, "MAIL FROM and From: must be the login's "
                                   "address or one of its aliases")
    max_connections: int = setting(INTEGER, 40, "simultaneous connections per submission "
                                   "endpoint", minimum=1)
    max_per_ip: int = setting(INTEGER, 10, "simultaneous submission connections from one "
                              "address", minimum=1)


@dataclass(frozen=True)
class POP3Settings:
    roaming_relay_minutes: int = setting(INTEGER, 30, "minutes a POP3 login lets its address "
                                         "relay (POP-before-SMTP); 0 = off", minimum=0)
    # RFC 1939 section 3: at least 10 minutes
    timeout: int = setting(INTEGER, 600, "seconds of client silence before the server hangs up",
                           minimum=600)
    require_tls: bool = setting(BOOLEAN, False, "refuse USER/PASS before STLS on the plain "
                                "port; needs [tls]")
    max_connections: int = setting(INTEGER, 40, "simultaneous connections per pop3 or pop3s "
                                   "endpoint", minimum=1)
    max_per_ip: int = setting(INTEGER, 10, "simultaneous POP3 connections from one address",
                              minimum=1)


@dataclass(frozen=True)
class QueueSettings:
    concurrency_local: int = setting(INTEGER, 10, "local deliveries at once (qmail "
                                     "concurrencylocal)", minimum=1, maximum=1000)
    concurrency_remote: int = setting(INTEGER, 20, "remote deliveries at once (qmail "
                                      "concurrencyremote)", minimum=1, maximum=1000)
    concurrency_destination: int = setting(INTEGER, 5, "remote deliveries at once to one "
                                           "destination, a domain or a route's host (Postfix "
                                           "default_destination_concurrency_limit)",
                                           minimum=1, maximum=1000)
    lifetime_days: int = setting(INTEGER, 7, "days a message is retried before it bounces "
                                 "(qmail queuelifetime)", minimum=1)
    connect_timeout: int = setting(INTEGER, 60, "seconds to connect to a remote server (qmail "
                                   "timeoutconnect)", minimum=1)
    # Caps the per-reply deadlines of RFC 5321 4.5.3.2 (smtp/client.py REPLY_DEADLINES, at most
    # 600 s), so the default is their largest: a lower value shortens every wait.
    reply_timeout: int = setting(INTEGER, 600, "most seconds to wait for one complete reply of "
                                 "a remote server, however slowly it trickles (qmail "
                                 "timeoutremote; below it RFC 5321's limit per command, "
                                 "docs/LIMITS.md)", minimum=1)


@dataclass(frozen=True)
class Route:
    domain: str                        # "" = every other domain
    host: str
    port: int = 25


@dataclass(frozen=True)
class DNSSettings:
    nameservers: tuple[tuple[str, int], ...] = setting(
        HOSTPORTS, (), "resolvers to ask, \"host\" or \"host:port\" (port 53 by default)",
        shown="[] (/etc/resolv.conf)")


@dataclass(frozen=True)
class DKIMSettings:
    sign: bool = setting(BOOLEAN, True, "sign outbound mail of local domains that have a key "
                         "(DATA/dkim; docs/MAILAUTH.md)")
    selector: str = setting(STRING, "mail", "selector `dkim keygen` uses when given none")


# docs/MAILAUTH.md: off skips the lookups, tag adds Authentication-Results only, enforce refuses.
VERIFY_SPF_MODES = ("off", "tag", "enforce")
VERIFY_DKIM_MODES = ("off", "tag")
VERIFY_DMARC_MODES = ("off", "tag", "enforce")


@dataclass(frozen=True)
class VerifySettings:
    spf: str = setting(STRING, "tag", "SPF at MAIL FROM; enforce: 550 5.7.23 on an SPF fail "
                       "(-all)", choices=VERIFY_SPF_MODES)
    dkim: str = setting(STRING, "tag", "DKIM signatures after DATA", choices=VERIFY_DKIM_MODES)
    dmarc: str = setting(STRING, "enforce", "DMARC after DATA; enforce: p=reject gets 550 "
                         "5.7.1, p=quarantine is delivered marked", choices=VERIFY_DMARC_MODES)


@dataclass(frozen=True)
class LogSettings:
    rotate_bytes: int = setting(INTEGER, 1000000, "size at which current is rotated (multilog "
                                "s1000000)", minimum=4096)
    keep: int = setting(INTEGER, 10, "log files kept, current included (multilog n10)", minimum=2)
    directory: Path | None = setting(PATH, None, "log directory", shown="DATA/log")
    stdout: bool = setting(BOOLEAN, False, "log to standard output (the journal) instead of files")


@dataclass(frozen=True)
class AdminSettings:
    socket_mode: int = setting(INTEGER, 0o600, "mode of the admin unix socket; other users are "
                               "never let in", shown="0o600")
    socket_group: str | None = setting(STRING, None, "group that may use the admin socket "
                                       "(mode 0660 then)")
    token_file: Path | None = setting(PATH, None, "file holding the token a TCP admin endpoint "
                                      "requires")
    max_connections: int = setting(INTEGER, 10, "simultaneous admin connections, all "
                                   "endpoints together", minimum=1)
    max_per_ip: int = setting(INTEGER, 10, "simultaneous admin connections from one address "
                              "(TCP endpoints)", minimum=1)


@dataclass(frozen=True)
class MetricsSettings:
    allow_public: bool = setting(BOOLEAN, False, "let [listen] metrics listen on a non-loopback "
                                 "address; the metrics then answer anyone who reaches the port "
                                 "(no authentication): put a firewall in front")


@dataclass(frozen=True)
class ScanSettings:
    clamd: str = setting(STRING, "", "clamd endpoint, e.g. \"unix:/run/clamav/clamd.ctl\" or "
                         "\"tcp:127.0.0.1:3310\"; \"\" = no virus scanning")
    spam: str = setting(STRING, "", "rspamd's normal worker, e.g. \"tcp:127.0.0.1:11333\"; "
                        "\"\" = no spam scoring")
    on_error: str = setting(STRING, "tempfail", "scanner down or slower than timeout: "
                            "tempfail (451) or accept (marked NOT SCANNED)",
                            choices=("tempfail", "accept"))
    timeout: int = setting(INTEGER, 30, "seconds for one scan", minimum=1)
    # clamd's own StreamMaxLength default (25 MiB)
    max_bytes: int = setting(INTEGER, 26214400, "larger messages are not sent to the scanners "
                             "(logged, marked NOT SCANNED)", minimum=1)
    spam_tag_score: float = setting(NUMBER, 6.0, "X-Spam-Flag: YES at or above this score")
    spam_reject_score: float = setting(NUMBER, 15.0, "550 5.7.1 at or above this score")


@dataclass(frozen=True)
class UsersSettings:
    database: str = setting(STRING, "", "where domains, users, aliases and roaming grants live: "
                            "\"\" = DATA/users.sqlite (one node); a libpq URI "
                            "\"postgresql://...\" shared by several nodes (docs/SEVERAL_NODES.md)")


@dataclass(frozen=True)
class Settings:
    hostname: str = setting(STRING, doc="greeting and Received: name (qmail's me)",
                            shown="the machine's name (socket.getfqdn())")
    data: Path = setting(PATH, doc="state directory: queue, mailboxes, user store, logs",
                         shown="./var (in the directory the server starts in)")
    default_domain: str | None = setting(STRING, None, "domain of a login without @ (vpopmail's "
                                         "default domain)")
    bcrypt_cost: int = setting(INTEGER, 12, "bcrypt cost of new password hashes", minimum=4,
                               maximum=31)
    mailboxes: Path | None = setting(PATH, None, "the Maildir tree (DOMAIN/USER/Maildir); a tree "
                                     "shared by several nodes, e.g. on NFS", shown="DATA/domains")
    config_path: Path | None = None
    listen: ListenSettings = section(ListenSettings, "Where each service listens: lists of "
                                     "Twisted endpoint strings; [] turns a service off.")
    tls: TLSSettings = section(TLSSettings, "Certificate for STARTTLS, STLS and the implicit-TLS "
                               "ports; re-read on reload.")
    smtp: SMTPSettings = section(SMTPSettings, "The SMTP service and its limits (the submission "
                                 "ports share them).")
    submission: SubmissionSettings = section(SubmissionSettings, "Policy of the submission "
                                             "ports (and of AUTH on port 25).")
    pop3: POP3Settings = section(POP3Settings, "The POP3 service.")
    queue: QueueSettings = section(QueueSettings, "The queue and its deliveries.")
    routes: tuple[Route, ...] = setting(ROUTES, (), "qmail smtproutes: mail for a domain (and "
                                        "its subdomains) goes to that host instead of its MX; "
                                        "\"\" = every other domain", shown="{} (MX lookups)")
    dns: DNSSettings = section(DNSSettings, "DNS lookups (MX, addresses, DNSBLs).")
    dkim: DKIMSettings = section(DKIMSettings, "DKIM signing of mail from AUTH and RELAYCLIENT "
                                 "clients, the sendmail command and bounces; re-read on reload.")
    verify: VerifySettings = section(VerifySettings, "Checks of mail from the internet (not "
                                     "from AUTH, RELAYCLIENT or roaming-grant clients); "
                                     "re-read on reload.")
    log: LogSettings = section(LogSettings, "The mail log: one line per event, rotated by size "
                               "like multilog.")
    admin: AdminSettings = section(AdminSettings, "Access to the admin protocol.")
    metrics: MetricsSettings = section(MetricsSettings, "The Prometheus endpoint, [listen] "
                                       "metrics.")
    scan: ScanSettings = section(ScanSettings, "Content checks after the final dot, before the "
                                 "250 (qmail-scanner): viruses through clamd, spam through "
                                 "rspamd; see docs/SCANNING.md.")
    users: UsersSettings = section(UsersSettings, "The user directory and roaming grants (several "
                                   "nodes share one PostgreSQL database).")
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


# --- the schema, read off the declarations above ----------------------------------------------

@dataclass(frozen=True)
class Key:
    """One configuration key as declared by setting(): `name` is its dotted name."""
    name: str
    kind: str
    default: Any
    doc: str
    minimum: int | None
    maximum: int | None
    shown: str | None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Section:
    """One [table]: its name, its class in the settings tree, its meaning and its keys."""
    name: str
    cls: type
    doc: str
    keys: dict[str, Key]


def _keys_of(cls: type, prefix: str) -> dict[str, Key | Section]:
    out: dict[str, Key | Section] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "section" in meta:
            keys = _keys_of(meta["section"], f"{f.name}.")
            out[f.name] = Section(f.name, meta["section"], meta["doc"],
                                  {k: v for k, v in keys.items() if isinstance(v, Key)})
        elif "kind" in meta:
            out[f.name] = Key(prefix + f.name, meta["kind"],
                              None if f.default is dataclasses.MISSING else f.default,
                              meta["doc"], meta["minimum"], meta["maximum"], meta["shown"],
                              meta.get("choices"))
    return out


# Every key of the file: top-level keys and [sections], in declaration order.
SCHEMA: dict[str, Key | Section] = _keys_of(Settings, "")

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")

# A DKIM selector: one or more DNS labels (RFC 6376 section 3.1), as mailauth/keys.py checks it.
_SELECTOR = re.compile(r"(?=.{1,63}$)(?!-)[A-Za-z0-9_-]+(?<!-)(?:\.(?!-)[A-Za-z0-9_-]+(?<!-))*")

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


def _convert(file: str, key: str, spec: Key, value: Any, base: Path) -> Any:
    kind = spec.kind
    if kind == INTEGER:
        if type(value) is not int:
            raise _error(file, key, f"expected integer, got {_type_name(value)}")
        low, high = spec.minimum, spec.maximum
        if low is not None and value < low:
            raise _error(file, key, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise _error(file, key, f"must be at most {high}, got {value}")
        return value
    if kind == NUMBER:
        if type(value) not in (int, float) or value != value or value in (float("inf"),
                                                                           float("-inf")):
            raise _error(file, key, f"expected a finite number, got {_type_name(value)}")
        return float(value)
    if kind == BOOLEAN:
        if type(value) is not bool:
            raise _error(file, key, f"expected boolean, got {_type_name(value)}")
        return value
    if kind == STRING:
        if not isinstance(value, str):
            raise _error(file, key, f"expected string, got {_type_name(value)}")
        if spec.choices is not None and value not in spec.choices:
            raise _error(file, key, f"must be one of {', '.join(spec.choices)}, got {value!r}")
        return value
    if kind == PATH:
        if value == "" and spec.name in EMPTY_MEANS_DEFAULT:
            return None
        if not isinstance(value, str) or not value or "\0" in value:
            raise _error(file, key, f"expected a path string, got {_type_name(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    if kind in (STRINGS, ENDPOINTS, HOSTPORTS):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _error(file, key, f"expected {kind}, got {_type_name(value)}")
        if kind == ENDPOINTS:
            for v in value:
                why = check_endpoint(v)
                if why:
                    raise _error(file, key, why)
        if kind == HOSTPORTS:
            return tuple(_host_port(file, key, v, 53) for v in value)
        if kind == STRINGS:
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


def _walk(file: str, table: Mapping[str, Any], schema: Mapping[str, Key | Section],
          prefix: str, base: Path, out: dict[str, Any]) -> None:
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        spec = schema.get(key)
        if spec is None:
            raise _error(file, dotted, "unknown key")
        if isinstance(spec, Section):
            if not isinstance(value, dict):
                raise _error(file, dotted, f"expected table, got {_type_name(value)}")
            _walk(file, value, spec.keys, dotted + ".", base, out)
        elif spec.kind == ROUTES:
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
            out[dotted] = _convert(file, dotted, spec, value, base)


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
                  *, cwd: Path | None = None, check_files: bool = True) -> Settings:
    """Build Settings from embedded defaults, the TOML file, then command-line overrides.

    `overrides` uses the dotted keys of the schema ("data", "hostname", "listen.smtp", ...), with
    values already in their final types (lists of endpoint strings, path strings).
    `check_files=False` skips the files only the server reads (TLS, rules, admin token): the
    sendmail command needs none of them and may run as a user who cannot read them.
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
        _walk(str(config_path), table, SCHEMA, "", config_path.parent, flat)
    for key, value in (overrides or {}).items():
        flat[key] = _convert("command line", key, _lookup_schema(key), value, cwd)

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

    listen_kw = sections.setdefault("listen", {})
    if "admin" not in listen_kw:
        listen_kw["admin"] = (f"unix:{_escape_endpoint_path(data / 'admin.sock')}",)
    parts = {name: spec.cls(**sections.get(name, {}))
             for name, spec in SCHEMA.items() if isinstance(spec, Section)}
    listen, tls, smtp, admin = parts["listen"], parts["tls"], parts["smtp"], parts["admin"]
    log = parts["log"]
    if log.directory is not None:
        log = parts["log"] = dataclasses.replace(
            log, directory=Path(os.path.abspath(log.directory)))

    # Files that must exist: a missing one stops start-up now, not at the first connection.
    if (tls.cert is None) != (tls.key is None):
        raise _error(where, "tls", "cert and key must be given together")
    for name in ("cert", "key"):
        p = getattr(tls, name)
        if check_files and p is not None and not p.is_file():
            raise _error(where, f"tls.{name}", f"file not found: {p}")
    if check_files and tls.cert is not None:
        _check_tls_files(where, tls.cert, tls.key)
    for kind in ("pop3s", "submissions"):
        if getattr(listen, kind) and not tls.enabled:
            raise _error(where, f"listen.{kind}", "needs a [tls] cert and key")
    if sections.get("pop3", {}).get("require_tls") and not tls.enabled:
        raise _error(where, "pop3.require_tls", "needs a [tls] cert and key (for STLS)")
    if not _SELECTOR.fullmatch(parts["dkim"].selector):
        raise _error(where, "dkim.selector", f"{parts['dkim'].selector!r} is not a DKIM selector "
                     f"(DNS labels: letters, digits, '-', '_', '.')")
    _check_scan(where, parts["scan"])
    database = parts["users"].database
    if database and not database.startswith(("postgresql://", "postgres://")):
        raise _error(where, "users.database", "expected \"\" (SQLite in the data directory) "
                     "or a postgresql:// URI")
    if top.get("mailboxes") is not None:
        top["mailboxes"] = Path(os.path.abspath(top["mailboxes"]))
    rules = None
    if check_files and smtp.rules is not None:
        rules = load_rules(smtp.rules)
    for ep in listen.inject:
        if not ep.startswith("unix:"):
            raise _error(where, "listen.inject", f"{ep!r} is not a unix: endpoint (the "
                         "caller's uid comes from the unix socket's peer credentials)")
    if check_files and admin.token_file is not None and not admin.token_file.is_file():
        raise _error(where, "admin.token_file", f"file not found: {admin.token_file}")
    for ep in listen.metrics:
        # Never on a public address by default: the counters tell an outsider how busy the
        # server is, how many logins fail, how large the queue is.
        if not ep.startswith("unix:") and not _loopback_endpoint(ep) and \
                not parts["metrics"].allow_public:
            raise _error(where, "listen.metrics",
                         f"{ep!r} is not on a loopback address: set interface=127.0.0.1 (or "
                         "::1), or [metrics] allow_public = true with a firewall in front")
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
        config_path=config_path, routes=routes, rules=rules,
        cli_overrides=tuple((k, v) for k, v in (overrides or {}).items()), cwd=cwd,
        **top, **parts)


def _check_scan(where: str, scan: ScanSettings) -> None:
    from mailappliance.scan import endpoints
    if scan.clamd:
        why = endpoints.check_endpoint(scan.clamd)
        if why:
            raise _error(where, "scan.clamd", why)
    if scan.spam:
        try:
            _kind, text = endpoints.split_scorer(scan.spam)
        except ValueError as e:
            raise _error(where, "scan.spam", str(e)) from None
        why = endpoints.check_endpoint(text)
        if why:
            raise _error(where, "scan.spam", why)
    if scan.spam_tag_score > scan.spam_reject_score:
        raise _error(where, "scan.spam_tag_score", "must not be above spam_reject_score")


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
    pems = {}
    for name, path in (("cert", cert), ("key", key)):
        # A file that cannot be read says why (permission denied), not "not a PEM ...".
        try:
            pems[name] = path.read_bytes()
        except OSError as e:
            raise _error(where, f"tls.{name}", f"cannot read {path}: {e.strerror or e}") \
                from None
    try:
        crypto.load_certificate(crypto.FILETYPE_PEM, pems["cert"])
    except Exception:
        raise _error(where, "tls.cert", f"{cert} is not a PEM certificate") from None
    try:
        crypto.load_privatekey(crypto.FILETYPE_PEM, pems["key"])
    except Exception:
        raise _error(where, "tls.key", f"{key} is not a PEM private key") from None


def _loopback_endpoint(ep: str) -> bool:
    m = re.search(r"(?:^|:)interface=((?:\\.|[^:\\])+)", ep)   # "\:" escapes a colon (::1)
    if not m:
        return False
    iface = m.group(1).replace("\\", "")
    return iface.startswith("127.") or iface in ("::1", "localhost")


def _escape_endpoint_path(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


def _lookup_schema(dotted: str) -> Key:
    """The key a command-line override names (routes are a table, not an option)."""
    name, _, rest = dotted.partition(".")
    node = SCHEMA.get(name)
    if isinstance(node, Section):
        node = node.keys.get(rest)
    elif rest:
        node = None
    if node is None or node.kind == ROUTES:
        raise ConfigError(f"command line: {dotted}: unknown option")
    return node


# --- the configuration reference (docs/CONFIGURATION.md) ---------------------------------------

_REFERENCE_HEAD = """\
# Configuration reference

<!-- Generated from the schema in mailappliance/config.py by
     `python -m mailappliance.config --reference > docs/CONFIGURATION.md`.
     Do not edit by hand: tests/unit/test_config.py fails when this file and the schema differ. -->

mailappliance reads one TOML file: `twistd -n mailappliance -c FILE` for the server,
`mailappliance --config FILE ...` for the command. Without a file every key has the default
below and the state lives in `./var` (`--data DIR` for another directory).
`conf/mailappliance.toml` is a commented production example.

- Options of the server override the file: `--data DIR`, `--hostname NAME`, and `--smtp EP`,
  `--submission EP`, `--submissions EP`, `--pop3 EP`, `--pop3s EP`, `--admin EP` (each may be
  repeated, and replaces that key of `[listen]`).
- Relative paths in the file are relative to the file's directory; those given on the command
  line, to the current directory.
- A mistake (unknown key, wrong type, value outside its limits, unreadable file, bad rules line,
  missing or mismatched TLS files) stops start-up with one line that names the file, the key or
  line, and what is wrong.
- `mailappliance reload` or SIGHUP re-reads the file and the rules file; a file with a mistake is
  refused and the old configuration stays. `data`, `[listen]`, `[log] directory` and `[admin]`
  `socket_mode` and `socket_group` keep their old values until a restart.

Types: an *integer* is a TOML integer (`0o600` for a mode); a *list of endpoints* holds Twisted
server endpoint strings such as `"tcp:25"`, `"tcp:25:interface=192.0.2.10"`, `"tcp6:25"`,
`"unix:/run/mailappliance/admin.sock"` or `"systemd:domain=INET:index=0"`; a *list of strings*
holds DNS zone names. "DATA" stands for the data directory.
"""

_REFERENCE_RULES = """\
## The rules file (`[smtp] rules`)

ucspi-tcp's tcprules syntax, one rule a line; the first line that matches the client wins:

```
127.0.0.1:allow,RELAYCLIENT=""
192.168.1.10-20:allow,RBLSMTPD=""
10.0.0.0/8:deny
:allow
```

Addresses are exact, dotted prefixes (`127.`), ranges (`10-20`), CIDR blocks (an extension,
IPv6 too) or empty (every client). `deny` closes the connection without a greeting. Variables:
`RELAYCLIENT` (set: the client may relay), `RBLSMTPD` (empty: no DNSBL lookup; text: refuse
with 451 and that text; `-text`: with 553), `GREETDELAY` (seconds before the greeting; a
client that talks first is refused with 554). Without a rules file nobody relays, loopback
included.
"""


def _shown(spec: Key) -> str:
    if spec.shown is not None:
        return spec.shown
    value = spec.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _limits(spec: Key) -> str:
    if spec.choices is not None:
        return "one of " + ", ".join(f"`{c}`" for c in spec.choices)
    if spec.minimum is not None and spec.maximum is not None:
        return f"{spec.minimum} to {spec.maximum}"
    if spec.minimum is not None:
        return f"at least {spec.minimum}"
    if spec.maximum is not None:
        return f"at most {spec.maximum}"
    return ""


def _table(keys: list[Key]) -> list[str]:
    rows = ["| key | type | default | limits | meaning |", "| --- | --- | --- | --- | --- |"]
    for spec in keys:
        name = spec.name.rpartition(".")[2]
        cells = [f"`{name}`", spec.kind, _shown(spec), _limits(spec), spec.doc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def reference() -> str:
    """docs/CONFIGURATION.md: every key of SCHEMA with its type, default, limits and meaning."""
    out = [_REFERENCE_HEAD, "## Top level", ""]
    top = [spec for spec in SCHEMA.values() if isinstance(spec, Key) and spec.kind != ROUTES]
    out += _table(top)
    for spec in SCHEMA.values():
        if isinstance(spec, Section):
            out += ["", f"## [{spec.name}]", "", spec.doc, ""]
            out += _table(list(spec.keys.values()))
        elif spec.kind == ROUTES:
            out += ["", f"## [{spec.name}]", "",
                    f"A {spec.kind}, default {_shown(spec)}: {spec.doc}. Example:", "",
                    "```toml", "[routes]", '"example.org" = "127.0.0.1:2526"',
                    '"" = "smarthost.example.net"', "```"]
    out += ["", _REFERENCE_RULES]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m mailappliance.config")
    parser.add_argument("--reference", action="store_true",
                        help="print the configuration reference (docs/CONFIGURATION.md)")
    args = parser.parse_args(argv)
    if not args.reference:
        parser.print_usage()
        return 2
    print(reference(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
