"""Read a qmail + vpopmail host's files into a Plan (blocking reads; writes nothing).

Where things are, as qmail and vpopmail lay them out:

    QMAIL/control/{me,defaultdomain,rcpthosts,morercpthosts,locals,virtualdomains,...}
    QMAIL/users/assign              +example.com-:example.com:89:89:/home/vpopmail/domains/...
    QMAIL/alias/.qmail-*            aliases of the host's system users (not carried over)
    VPOPMAIL/etc/defaultdomain      vpopmail's default login domain
    VPOPMAIL/domains/D/vpasswd      the users (vpasswd.cdb is built from it)
    VPOPMAIL/domains/D/.qmail-*     the domain's aliases; .qmail-default runs vdelivermail
    VPOPMAIL/domains/D/[0-9/]USER/{Maildir,.qmail}   (vpasswd's home field says where)

Paths written in users/assign and vpasswd are those of the old host (/home/vpopmail/...). When
the tree is read somewhere else (a copy mounted at another path, `--vpopmail`), they are taken
relative to the domain directory users/assign names and found under VPOPMAIL/domains/.

Maildirs are not listed here (they can hold millions of files): execute.py walks them once,
while it moves them or, for --dry-run, to count them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mailappliance.migrate import qmailfiles as qf
from mailappliance.migrate.qmailfiles import Note, at
from mailappliance.users import legacy, passwords
from mailappliance.users.store import StoreError, normalize_domain, normalize_local

# Control files carried into the configuration (toml_out.py) or checked against the domains.
CONTROL_FILES = ("me", "defaultdomain", "rcpthosts", "morercpthosts", "locals",
                 "virtualdomains", "databytes", "smtproutes", "concurrencylocal",
                 "concurrencyremote", "queuelifetime", "timeoutsmtpd", "timeoutremote",
                 "timeoutconnect")
# Control files that only exist as compiled data or say nothing the appliance needs.
QUIET_CONTROL = ("morercpthosts.cdb", "defaulthost", "plusdomain", "envnoathost",
                 "idhost", "helohost", "bouncehost", "doublebouncehost", "localiphost")
# A file we read whole (control files, vpasswd, .qmail) larger than this is not what it
# claims to be; vpasswd of 100,000 users is about 10 MB.
MAX_TEXT_FILE = 256 * 1024 * 1024
DEFAULT_TCP_RULES = Path("/etc/tcp.smtp")


@dataclass
class ControlValues:
    """qmail control files that become configuration (toml_out.py), with their sources."""
    control_dir: str = "control"
    me: str | None = None
    default_domain: str | None = None
    default_domain_source: str = ""
    databytes: int | None = None
    concurrency_local: int | None = None
    concurrency_remote: int | None = None
    queuelifetime: int | None = None
    timeoutsmtpd: int | None = None
    timeoutremote: int | None = None
    timeoutconnect: int | None = None
    routes: list[qf.SMTPRoute] = field(default_factory=list)
    routes_source: str = ""
    servercert: Path | None = None


@dataclass
class PlannedUser:
    local: str
    domain: str
    where: str                   # vpasswd:line
    kind: str                    # md5-crypt, sha256-crypt, sha512-crypt, des-crypt, bcrypt,
    #                              clear (bcrypt at import) or disabled
    password_hash: str           # kept as it is; "" when `clear` is to be hashed
    clear: str | None            # vpopmail's clear-text field, only in memory, never stored
    quota: int
    maildir: Path | None         # the source Maildir
    disabled_reason: str = ""
    home: Path | None = None     # the source user directory (its .qmail)

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass
class PlannedAlias:
    address: str
    targets: list[str]
    where: str


@dataclass
class PlannedDomain:
    name: str
    directory: Path
    users: list[PlannedUser] = field(default_factory=list)
    aliases: list[PlannedAlias] = field(default_factory=list)


@dataclass
class Plan:
    qmail: Path
    vpopmail: Path
    rules_source: Path | None
    domains: list[PlannedDomain] = field(default_factory=list)
    control: ControlValues = field(default_factory=ControlValues)
    rules: qf.RulesCheck | None = None
    notes: list[Note] = field(default_factory=list)

    @property
    def users(self) -> list[PlannedUser]:
        return [u for d in self.domains for u in d.users]

    @property
    def aliases(self) -> list[PlannedAlias]:
        return [a for d in self.domains for a in d.aliases]


class SourceError(Exception):
    """The source cannot be read at all (a missing --qmail or --vpopmail directory)."""


def read_text(path: Path, notes: list[Note], *, missing_ok: bool = True,
              what: str = "") -> str | None:
    """The file's text, or None with a note saying why not (a missing file is quiet when
    `missing_ok`). Text that is not UTF-8 is read as Latin-1, with a warning."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_FILE + 1)
    except FileNotFoundError:
        if not missing_ok:
            notes.append(Note("error", str(path), f"missing{what}"))
        return None
    except OSError as e:
        notes.append(Note("error", str(path), f"cannot read: {e.strerror or e}{what}"))
        return None
    if len(raw) > MAX_TEXT_FILE:
        notes.append(Note("error", str(path), f"larger than {MAX_TEXT_FILE} bytes: not read"))
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        notes.append(Note("warning", str(path), "not UTF-8: read as Latin-1"))
        return raw.decode("latin-1")


def _rebase(path: str, old_base: str, new_base: Path) -> Path:
    """A path of the old host, found under the directory the tree is read from now."""
    old = old_base.rstrip("/")
    if old and (path == old or path.startswith(old + "/")):
        return new_base / path[len(old):].lstrip("/")
    return Path(path)


# --- the whole source ------------------------------------------------------------------------

def read_source(qmail: Path, vpopmail: Path, tcp_rules: Path | None = None,
                rules_given: bool = False) -> Plan:
    for name, path in (("--qmail", qmail), ("--vpopmail", vpopmail)):
        if not path.is_dir():
            why = "not a directory" if path.exists() else "no such directory"
            raise SourceError(f"{name} {path}: {why}")
    plan = Plan(Path(os.path.abspath(qmail)), Path(os.path.abspath(vpopmail)), None)
    notes = plan.notes
    control = _read_control(plan.qmail, plan.vpopmail, plan.control, notes)
    domains = _find_domains(plan.qmail, plan.vpopmail, control, notes)
    for name, directory in domains:
        domain = _read_domain(name, directory, notes)
        if domain is not None:
            plan.domains.append(domain)
    _check_rcpthosts(plan, control, notes)
    _note_qmail_aliases(plan.qmail, notes)
    _read_rules(plan, tcp_rules, rules_given)
    return plan


@dataclass
class _Control:
    rcpthosts: list[tuple[str, int, str]] = field(default_factory=list)   # (file, line, value)
    locals: list[str] = field(default_factory=list)
    virtualdomains: list[tuple[int, str, str]] = field(default_factory=list)
    virtualdomains_read: bool = False


def _read_control(qmail: Path, vpopmail: Path, values: ControlValues,
                  notes: list[Note]) -> _Control:
    cdir = qmail / "control"
    values.control_dir = str(cdir)
    out = _Control()
    texts: dict[str, str] = {}
    for name in CONTROL_FILES:
        text = read_text(cdir / name, notes)
        if text is not None:
            texts[name] = text
    values.me = qf.control_line(texts.get("me", ""))
    if values.me is None:
        notes.append(Note("warning", str(cdir / "me"),
                          "no host name (control/me): the configuration leaves hostname out"))
    vdefault = read_text(vpopmail / "etc" / "defaultdomain", notes)
    if vdefault is not None and qf.control_line(vdefault):
        values.default_domain = qf.control_line(vdefault).lower()
        values.default_domain_source = str(vpopmail / "etc" / "defaultdomain")
    elif qf.control_line(texts.get("defaultdomain", "")):
        values.default_domain = qf.control_line(texts["defaultdomain"]).lower()
        values.default_domain_source = str(cdir / "defaultdomain")
    for key, name in (("databytes", "databytes"), ("concurrency_local", "concurrencylocal"),
                      ("concurrency_remote", "concurrencyremote"),
                      ("queuelifetime", "queuelifetime"), ("timeoutsmtpd", "timeoutsmtpd"),
                      ("timeoutremote", "timeoutremote"), ("timeoutconnect", "timeoutconnect")):
        if name in texts:
            value, more = qf.control_int(texts[name], str(cdir / name))
            notes.extend(more)
            setattr(values, key, value)
    if "smtproutes" in texts:
        values.routes, more = qf.parse_smtproutes(texts["smtproutes"], str(cdir / "smtproutes"))
        values.routes_source = str(cdir / "smtproutes")
        notes.extend(more)
    for name in ("rcpthosts", "morercpthosts"):
        for number, value in qf.control_lines(texts.get(name, "")):
            out.rcpthosts.append((str(cdir / name), number, value.lower()))
    out.locals = [v.lower() for _, v in qf.control_lines(texts.get("locals", ""))]
    if "virtualdomains" in texts:
        out.virtualdomains_read = True
        out.virtualdomains, more = qf.parse_virtualdomains(texts["virtualdomains"],
                                                           str(cdir / "virtualdomains"))
        notes.extend(more)
    if (cdir / "servercert.pem").is_file():
        values.servercert = cdir / "servercert.pem"
    # Other control files: each named once, so nothing is dropped without a word.
    try:
        present = sorted(os.listdir(cdir))
    except OSError as e:
        notes.append(Note("error", str(cdir), f"cannot list: {e.strerror or e}"))
        present = []
    for name in present:
        if name in CONTROL_FILES or name in QUIET_CONTROL or name == "servercert.pem" \
                or name.endswith((".cdb", "~", ".bak", ".orig")) or name.startswith("."):
            continue
        notes.append(Note("skipped", str(cdir / name), "control file not carried over"))
    return out


def _find_domains(qmail: Path, vpopmail: Path, control: _Control,
                  notes: list[Note]) -> list[tuple[str, Path]]:
    """(domain, directory) of each vpopmail domain, from virtualdomains and users/assign."""
    assign_path = qmail / "users" / "assign"
    text = read_text(assign_path, notes, missing_ok=True)
    assigns: list[qf.Assign] = []
    if text is not None:
        assigns, more = qf.parse_assign(text, str(assign_path))
        notes.extend(more)
    by_prefix = {a.address: a for a in assigns if a.wildcard}
    found: list[tuple[str, Path]] = []
    taken: set[str] = set()

    def directory_of(a: qf.Assign) -> Path | None:
        here = vpopmail / "domains" / Path(a.home).name
        if here.is_dir():
            return here
        if Path(a.home).is_dir():
            return Path(a.home)
        return None

    if control.virtualdomains_read:
        source = str(qmail / "control" / "virtualdomains")
        real_homes = {}
        for number, domain, prefix in control.virtualdomains:
            a = by_prefix.get(prefix + "-")
            if a is not None and a.user.lower() == domain:
                real_homes[a.home] = domain
        for number, domain, prefix in control.virtualdomains:
            where = at(source, number)
            if domain.startswith(".") or "@" in domain:
                notes.append(Note("skipped", where, f"virtual domain entry {domain!r} "
                                  "(wildcard or single address) not carried over"))
                continue
            a = by_prefix.get(prefix + "-")
            if a is None:
                notes.append(Note("skipped", where, f"{domain}: no users/assign entry for "
                                  f"prefix {prefix!r} (not a vpopmail domain): not imported"))
                continue
            if a.user.lower() != domain and real_homes.get(a.home):
                notes.append(Note("skipped", where, f"{domain} is a vpopmail alias domain of "
                                  f"{real_homes[a.home]}: mailappliance has no alias domains; "
                                  f"add it as a domain with aliases if you need it"))
                continue
            directory = directory_of(a)
            if directory is None:
                notes.append(Note("error", at(str(assign_path), a.line),
                                  f"{domain}: domain directory {a.home} not found (also not "
                                  f"under {vpopmail / 'domains'})"))
                continue
            if domain not in taken:
                taken.add(domain)
                found.append((domain, directory))
        return found
    notes.append(Note("warning", str(qmail / "control" / "virtualdomains"),
                      "not readable: domains taken from users/assign and "
                      f"{vpopmail / 'domains'}"))
    for a in assigns:
        directory = directory_of(a)
        name = a.user.lower()
        if a.wildcard and directory is not None and (directory / "vpasswd").exists() \
                and name not in taken:
            taken.add(name)
            found.append((name, directory))
    if not found:
        try:
            entries = sorted(os.scandir(vpopmail / "domains"), key=lambda e: e.name)
        except OSError:
            entries = []
        for e in entries:
            if e.is_dir() and (Path(e.path) / "vpasswd").exists() and e.name not in taken:
                taken.add(e.name.lower())
                found.append((e.name.lower(), Path(e.path)))
    return found


# --- one domain ------------------------------------------------------------------------------

def _read_domain(name: str, directory: Path, notes: list[Note]) -> PlannedDomain | None:
    try:
        name = normalize_domain(name)
    except StoreError as e:
        notes.append(Note("skipped", str(directory), f"{e}: domain not imported"))
        return None
    vpasswd = directory / "vpasswd"
    text = read_text(vpasswd, notes)
    if text is None:
        if not vpasswd.exists() and not vpasswd.is_symlink():
            cdb = " (only vpasswd.cdb, which is built from it)" if \
                (directory / "vpasswd.cdb").exists() else ""
            notes.append(Note("error", str(vpasswd), f"missing{cdb}: users of {name} not "
                              "imported (users kept in MySQL or LDAP? export them to vpasswd "
                              "with vpopmail's vconvert first)"))
        return PlannedDomain(name, directory)
    vusers, more = qf.parse_vpasswd(text, str(vpasswd))
    notes.extend(more)
    old_home = _old_domain_home(vusers, directory)
    domain = PlannedDomain(name, directory)
    homes: dict[Path, str] = {}
    for v in vusers:
        user = _plan_user(v, name, directory, old_home, str(vpasswd), notes)
        if user is not None:
            domain.users.append(user)
            if user.maildir is not None:
                homes[user.maildir] = user.local
    users = {u.local: u for u in domain.users}
    for u in domain.users:
        _read_user_dotqmail(u, notes)
    _read_domain_dotqmails(domain, users, homes, old_home, notes)
    return domain


def _old_domain_home(vusers: list[qf.VUser], directory: Path) -> str:
    """The domain directory as the old host wrote it in vpasswd's home fields: the longest
    path ending in the domain's directory name that the homes share."""
    base = directory.name
    for v in vusers:
        parts = v.home.rstrip("/").split("/")
        if base in parts:
            i = len(parts) - 1 - parts[::-1].index(base)
            return "/".join(parts[:i + 1])
    return str(directory)


def _plan_user(v: qf.VUser, domain: str, directory: Path, old_home: str, source: str,
               notes: list[Note]) -> PlannedUser | None:
    where = at(source, v.line)
    try:
        local = normalize_local(v.name)
    except StoreError as e:
        notes.append(Note("error", where, f"{e}: user not imported"))
        return None
    quota, remark = qf.parse_quota(v.quota)
    if quota is None:
        notes.append(Note("warning", where, f"{local}@{domain}: quota {v.quota!r} not "
                          "understood: no quota set"))
        quota = 0
    elif remark:
        notes.append(Note("warning", where, f"{local}@{domain}: {remark}"))
    if v.flags & qf.ACCESS_FLAGS:
        names = ", ".join(qf.flag_names(v.flags & qf.ACCESS_FLAGS))
        notes.append(Note("warning", where, f"{local}@{domain}: vpopmail flags {names} not "
                          "carried over: this user can log in and receive mail here"))
    kind, hashed, clear, reason = _password(v, notes, where, f"{local}@{domain}")
    home = _rebase(v.home, old_home, directory) if v.home else None
    maildir = home / "Maildir" if home is not None else None
    if maildir is not None and not maildir.is_dir():
        notes.append(Note("warning", where, f"{local}@{domain}: no Maildir at {maildir}: "
                          "the mailbox starts empty"))
        maildir = None
    return PlannedUser(local, domain, where, kind, hashed, clear, quota, maildir, reason, home)


def _password(v: qf.VUser, notes: list[Note], where: str, address: str):
    """-> (kind, hash to store, clear text to hash at import or None, disabled reason)."""
    kind = legacy.identify(v.hash)
    clear = v.clear
    if clear:
        if len(clear.encode("utf-8")) > passwords.MAX_PASSWORD_BYTES or \
                any(c in clear for c in "\0\r\n"):
            notes.append(Note("warning", where, f"{address}: clear-text password longer than "
                              f"{passwords.MAX_PASSWORD_BYTES} bytes (bcrypt's limit): "
                              "not used"))
        elif kind is None or passwords.verify_password(clear, v.hash):
            return "clear", "", clear, ""
        else:
            notes.append(Note("warning", where, f"{address}: clear-text field does not match "
                              "the password hash; the hash is kept (vchkpw checked the hash)"))
    if kind is not None:
        return kind, v.hash, None, ""
    shown = v.hash[:4] + "..." if len(v.hash) > 4 else (v.hash or "empty")
    reason = (f"password hash format not recognised ({shown!r})" if v.hash
              else "no password in vpasswd")
    notes.append(Note("warning", where, f"{address}: {reason}: user created DISABLED; set a "
                      f"password with `mailappliance user passwd {address}`"))
    return "disabled", passwords.DISABLED_PREFIX + v.hash, None, reason


# --- .qmail files ----------------------------------------------------------------------------

def _read_user_dotqmail(user: PlannedUser, notes: list[Note]) -> None:
    """A user's own .qmail (vdelivermail honours it): the mailbox itself is fine; forwards,
    programs and other files are not carried over and each line is reported."""
    home = user.home
    if home is None:
        return
    path = home / ".qmail"
    text = read_text(path, notes)
    if text is None:
        return
    for d in qf.parse_dotqmail(text):
        where = at(str(path), d.line)
        if d.kind == "maildir" and _same_maildir(d.value, home, user.maildir):
            continue
        if d.kind == "forward":
            notes.append(Note("skipped", where, f"{user.address}: forward to {d.value} not "
                              "carried over: mailappliance delivers a user's mail to its own "
                              "Maildir (no per-user forwards)"))
        elif d.kind == "program":
            notes.append(Note("skipped", where, f"{user.address}: program delivery "
                              f"|{d.value} not carried over"))
        else:
            notes.append(Note("skipped", where, f"{user.address}: delivery to {d.value} not "
                              "carried over"))


def _same_maildir(line: str, home: Path, maildir: Path | None) -> bool:
    target = (home / line) if not line.startswith("/") else Path(line)
    return os.path.normpath(target) == os.path.normpath(home / "Maildir") or \
        (maildir is not None and os.path.normpath(target) == os.path.normpath(maildir))


def _read_domain_dotqmails(domain: PlannedDomain, users: dict[str, PlannedUser],
                           homes: dict[Path, str], old_home: str, notes: list[Note]) -> None:
    try:
        names = sorted(n for n in os.listdir(domain.directory) if n.startswith(".qmail-"))
    except OSError as e:
        notes.append(Note("error", str(domain.directory), f"cannot list: {e.strerror or e}"))
        return
    for filename in names:
        path = domain.directory / filename
        text = read_text(path, notes)
        if text is None:
            continue
        local = qf.dotqmail_local(filename)
        if local == "default":
            _default_dotqmail(domain, path, text, notes)
            continue
        if local is None or local.endswith("-default"):
            notes.append(Note("skipped", str(path), "address-extension wildcard "
                              f"({local}-*) not carried over"))
            continue
        try:
            local = normalize_local(local)
        except StoreError as e:
            notes.append(Note("skipped", str(path), f"{e}: alias not carried over"))
            continue
        address = f"{local}@{domain.name}"
        if local in users:
            notes.append(Note("skipped", str(path), f"{address} is both a user and this alias "
                              "file; qmail used the file, mailappliance delivers to the user: "
                              "alias not carried over"))
            continue
        targets: list[str] = []
        for d in qf.parse_dotqmail(text):
            where = at(str(path), d.line)
            if d.kind == "forward":
                target = d.value if "@" in d.value else f"{d.value}@{domain.name}"
                targets.append(target.lower() if "@" in target else target)
            elif d.kind == "maildir":
                line = d.value
                full = Path(os.path.normpath(
                    domain.directory / line if not line.startswith("/")
                    else _rebase(line, old_home, domain.directory)))
                owner = homes.get(full)
                if owner is not None:
                    targets.append(f"{owner}@{domain.name}")
                else:
                    notes.append(Note("skipped", where, f"{address}: delivery to the Maildir "
                                      f"{line} (no user of {domain.name}) not carried over"))
            elif d.kind == "program":
                notes.append(Note("skipped", where, f"{address}: program delivery |{d.value} "
                                  "not carried over"))
            else:
                notes.append(Note("skipped", where, f"{address}: delivery to {d.value} not "
                                  "carried over"))
        if targets:
            domain.aliases.append(PlannedAlias(address, list(dict.fromkeys(targets)),
                                               str(path)))


def _default_dotqmail(domain: PlannedDomain, path: Path, text: str, notes: list[Note]) -> None:
    """.qmail-default: vdelivermail's choice for unknown users of the domain."""
    for d in qf.parse_dotqmail(text):
        where = at(str(path), d.line)
        v = qf.parse_vdelivermail(d.value) if d.kind == "program" else None
        if v is None:
            notes.append(Note("skipped", where, f"catch-all delivery for {domain.name} "
                              f"({d.value}) not carried over"))
        elif v.mode == "bounce":
            continue      # what mailappliance does: unknown users are refused
        elif v.mode == "delete":
            notes.append(Note("warning", where, f"{domain.name}: vdelivermail deleted mail for "
                              "unknown users; mailappliance refuses it at RCPT (550)"))
        else:
            notes.append(Note("skipped", where, f"{domain.name}: catch-all to {v.target} not "
                              "carried over (mailappliance refuses unknown users)"))


# --- rcpthosts, locals, qmail's own aliases, tcp.smtp ---------------------------------------

def _check_rcpthosts(plan: Plan, control: _Control, notes: list[Note]) -> None:
    ours = {d.name for d in plan.domains}
    me = (plan.control.me or "").lower()
    host_names = {me, "localhost", "localhost.localdomain", ""}
    listed = set()
    for source, number, value in control.rcpthosts:
        listed.add(value)
        where = at(source, number)
        if value in ours or value in host_names or value in control.locals:
            continue
        if value.startswith("."):
            notes.append(Note("skipped", where, f"wildcard {value} not carried over: "
                              "mailappliance accepts mail for its own domains only"))
        elif value not in {d for _, d, _ in control.virtualdomains}:
            notes.append(Note("skipped", where, f"mail for {value} was accepted and relayed "
                              "(backup MX?); mailappliance accepts mail for its own domains "
                              "only: not carried over"))
    if control.rcpthosts:
        for name in sorted(ours - listed):
            notes.append(Note("warning", str(plan.qmail / "control" / "rcpthosts"),
                              f"{name} was not listed (qmail refused mail for it); "
                              "mailappliance accepts mail for every domain it has"))
    for name in control.locals:
        if name not in host_names and name not in ours:
            notes.append(Note("skipped", str(plan.qmail / "control" / "locals"),
                              f"local domain {name} delivers to system accounts: not imported"))


def _note_qmail_aliases(qmail: Path, notes: list[Note]) -> None:
    try:
        names = sorted(n for n in os.listdir(qmail / "alias") if n.startswith(".qmail-"))
    except OSError:
        return
    for n in names:
        notes.append(Note("info", str(qmail / "alias" / n), "alias of the host's system users "
                          "(postmaster@ the host name goes to the default domain's postmaster "
                          "in mailappliance): not carried over"))


def _read_rules(plan: Plan, tcp_rules: Path | None, rules_given: bool) -> None:
    candidates = [tcp_rules or DEFAULT_TCP_RULES]
    if not rules_given:
        candidates.append(plan.vpopmail / "etc" / "tcp.smtp")
    for path in candidates:
        if path.exists() or path.is_symlink():
            text = read_text(path, plan.notes, missing_ok=False)
            if text is not None:
                plan.rules_source = path
                plan.rules = qf.check_rules(text, str(path))
            return
    plan.notes.append(Note("warning", str(candidates[0]), "no tcprules source found: the "
                           "configuration has no rules file, so no client relays by its IP "
                           "address (AUTH and POP-before-SMTP still do)"))
