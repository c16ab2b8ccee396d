"""`mailappliance check`: the offline configuration test (Postfix's `postfix check`), run
before a start or a reload. It reads what the server would read and says, one line per
problem, what would go wrong:

- the TOML file (syntax, keys, types, limits: config.py's own checks);
- the rules file (every line parses) and that the server's user may read it;
- the TLS certificate and key: each readable by the server's user (a reload runs after the
  privilege drop), each parsable, and the key belonging to the certificate;
- the admin token file, the admin socket group;
- the data directory: it exists, belongs to the server's user, no other user may look into
  it (0700), the user store's files are private, and no entry at its top belongs to someone else;
- listeners that would clash: two endpoints on the same port and an overlapping address, or
  the same unix socket path twice; an inject socket whose directory other users cannot enter;
- aliases that are also users (made before such collisions were refused; never used);
- the DKIM signing keys under DATA/dkim: each file a usable key (PEM, RSA of at least 1024
  bits or Ed25519, named <selector>._domainkey.<domain>.pem), readable by the server's user and
  by nobody else -- the same one line per file the server logs once at start-up.

"The server's user" is `--user NAME` (what twistd's --uid says in the unit), else the owner
of the data directory (the rule of privileges.py: the server runs as the data directory's
owner), else the user running the check. Permissions are judged from the mode bits, owner
and groups of each file and of every directory above it; ACLs are not read.

Blocking and without Twisted: file reads, stat, SQLite. Nothing is written anywhere.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

from mailappliance.config import ConfigError, Settings, load_rules
from mailappliance.datadir import STORE_FILES
from mailappliance.pickup.core import unix_path

# The user store is looked at read-only with this busy timeout (a running server may write).
STORE_TIMEOUT_S = 5.0
# PEM files are a few KiB; larger is not one (tls.py's figure).
MAX_PEM_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerUser:
    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def by_uid(cls, uid: int) -> "ServerUser":
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return cls(str(uid), uid, frozenset())
        return cls(pw.pw_name, uid, frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid)))

    @classmethod
    def by_name(cls, name: str) -> "ServerUser":
        pw = pwd.getpwnam(name)
        return cls(pw.pw_name, pw.pw_uid, frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid)))

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})"


def server_user(settings: Settings, name: str | None) -> ServerUser:
    if name:
        try:
            return ServerUser.by_name(name)
        except KeyError:
            raise ConfigError(f"--user: no such user: {name}") from None
    try:
        return ServerUser.by_uid(os.stat(settings.data).st_uid)
    except OSError:
        return ServerUser.by_uid(os.geteuid())


def _allowed(st: os.stat_result, user: ServerUser, bits: tuple[int, int, int]) -> bool:
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in user.gids:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


READ = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
EXEC = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


def access_problem(path: Path, user: ServerUser, what: str) -> str | None:
    """Why `user` could not read `path` (a directory above it it may not enter, or the file's
    own mode), or None. Problems this process meets itself (permission denied) say so."""
    path = Path(os.path.abspath(path))
    for parent in list(path.parents)[::-1]:
        try:
            st = os.stat(parent)
        except OSError as e:
            return f"{what}: cannot check {parent}: {e.strerror}"
        if not _allowed(st, user, EXEC):
            return (f"{what}: {path} is not readable by {user}: the directory {parent} "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}) does not let it in")
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{what}: {path}: {e.strerror}"
    if not _allowed(st, user, READ):
        owner = _name(st.st_uid)
        group = _group(st.st_gid)
        return (f"{what}: {path} is not readable by {user} (mode {stat.S_IMODE(st.st_mode):04o}"
                f", {owner}:{group})")
    return None


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _read(path: Path, what: str, problems: list[str]) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        problems.append(f"{what}: cannot read {path}: {e.strerror or e}")
        return None
    if len(data) > MAX_PEM_BYTES:
        problems.append(f"{what}: {path} is larger than {MAX_PEM_BYTES} bytes")
        return None
    return data


def check_tls(settings: Settings, user: ServerUser) -> list[str]:
    tls = settings.tls
    if tls.cert is None or tls.key is None:
        return []
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (Encoding, PublicFormat,
                                                              load_pem_private_key)
    problems: list[str] = []
    for what, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        why = access_problem(path, user, what)
        if why:
            problems.append(why)
    cert_pem = _read(tls.cert, "tls.cert", problems)
    key_pem = _read(tls.key, "tls.key", problems)
    chain = key = None
    if cert_pem is not None:
        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError:
            problems.append(f"tls.cert: {tls.cert} holds no PEM certificate")
    if key_pem is not None:
        try:
            key = load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):
            problems.append(f"tls.key: {tls.key} is not an unencrypted PEM private key")
    if chain and key is not None:
        def spki(k) -> bytes:
            return k.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if spki(chain[0].public_key()) != spki(key.public_key()):
            problems.append(f"tls.key: {tls.key} does not match the certificate {tls.cert}")
    return problems


def check_rules(settings: Settings, user: ServerUser) -> list[str]:
    path = settings.smtp.rules
    if path is None:
        return []
    problems = []
    why = access_problem(path, user, "smtp.rules")
    if why:
        problems.append(why)
    try:
        load_rules(path)
    except ConfigError as e:
        problems.append(str(e))
    return problems


def check_admin(settings: Settings, user: ServerUser) -> list[str]:
    problems = []
    admin = settings.admin
    if admin.socket_group:
        try:
            grp.getgrnam(admin.socket_group)
        except KeyError:
            problems.append(f"admin.socket_group: no such group: {admin.socket_group}")
    if admin.socket_mode & 0o007:
        problems.append(f"admin.socket_mode: {admin.socket_mode:o} lets every local user in; "
                        "use 600 or 660 with admin.socket_group")
    if admin.token_file is not None:
        why = access_problem(admin.token_file, user, "admin.token_file")
        if why:
            problems.append(why)
    return problems


def check_data(settings: Settings, user: ServerUser) -> list[str]:
    data = settings.data
    try:
        st = os.stat(data)
    except FileNotFoundError:
        return [f"data: {data} does not exist (install -d -o {user.name} -m 0700 {data})"]
    except OSError as e:
        return [f"data: {data}: {e.strerror}"]
    problems = []
    if not stat.S_ISDIR(st.st_mode):
        return [f"data: {data} is not a directory"]
    for parent in list(Path(os.path.abspath(data)).parents)[::-1]:
        try:
            pst = os.stat(parent)
        except OSError:
            break
        if not _allowed(pst, user, EXEC):
            problems.append(f"data: {user} may not enter {parent} (mode "
                            f"{stat.S_IMODE(pst.st_mode):04o}, owner {_name(pst.st_uid)}) "
                            f"above the data directory; let it in or move the data directory")
            break
    if st.st_uid != user.uid and user.uid != 0:      # root hands what it makes to the owner
        problems.append(f"data: {data} belongs to {_name(st.st_uid)} (uid {st.st_uid}), not "
                        f"to {user} that the server runs as; chown -R {user.name}: {data}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        problems.append(f"data: {data} is mode {mode:04o}: other users can look into the "
                        f"queue, the mailboxes and the password hashes; chmod 0700 {data}")
    try:
        entries = list(os.scandir(data))
    except OSError as e:
        return problems + [f"data: cannot list {data}: {e.strerror}"]
    for entry in entries:
        try:
            est = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if est.st_uid != user.uid and user.uid != 0:
            problems.append(f"data: {entry.path} belongs to {_name(est.st_uid)}, not to "
                            f"{user.name}; the server could not write it (chown {user.name}: "
                            f"{entry.path})")
        if entry.name in STORE_FILES and stat.S_IMODE(est.st_mode) & 0o077:
            problems.append(f"data: {entry.path} is mode {stat.S_IMODE(est.st_mode):04o}: it "
                            f"holds password hashes; chmod 600 {entry.path}")
    return problems


def check_directory(settings: Settings, user: ServerUser) -> list[str]:
    """[users] database = a PostgreSQL URI: reachable, its schema created or brought up to
    date (as the server would at start), no alias shadowed by a user; `mailboxes` usable by
    the server's user. Each problem one line, without the database password."""
    problems = []
    if settings.mailboxes is not None:
        if not settings.mailboxes.is_dir():
            problems.append(f"mailboxes: {settings.mailboxes} does not exist (create it, owned "
                            f"by {user.name}; on NFS see docs/SEVERAL_NODES.md)")
        else:
            why = access_problem(settings.mailboxes, user, "mailboxes")
            if why:
                problems.append(why)
    database = settings.users.database
    if not database:
        return problems
    from mailappliance.users import backend
    where = "users.database"
    try:
        from mailappliance.users.pgschema import SchemaError
    except ImportError:
        return problems + [f"{where}: PostgreSQL needs psycopg and psycopg_pool "
                           "(pip install 'mailappliance[postgresql]')"]
    try:
        store = backend.open_directory(database, settings.data, settings.mailboxes or "",
                                       settings.bcrypt_cost)
    except (SchemaError, OSError) as e:
        return problems + [f"{where}: {e}"]
    try:
        shadowed = sorted(store.shadowed_aliases())
    except OSError as e:
        return problems + [f"{where}: {e}"]
    finally:
        store.close()
    return problems + [f"users: alias {a} is also a user and is never used; `mailappliance "
                       f"alias del {a}`" for a in shadowed]


def check_dkim(settings: Settings, user: ServerUser) -> list[str]:
    """One line per unusable DKIM key file (mailauth/keys.py says what is wrong with it, as the
    server's start-up line does) or key the server's user could not read."""
    from mailappliance.mailauth import keys
    directory = keys.key_dir(settings.data)
    if not directory.is_dir():
        return []
    problems: list[str] = []
    unreadable: set[str] = set()
    try:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except OSError as e:
        return [f"dkim: cannot list {directory}: {e.strerror}"]
    for name in names[:keys.MAX_KEY_FILES]:
        why = access_problem(directory / name, user, "dkim")
        if why:
            problems.append(why)
            unreadable.add(str(directory / name))
    scanned = keys.scan(settings.data)
    unusable = scanned[1]
    for line in unusable:                       # "<path>: what is wrong"
        if line.split(": ", 1)[0] not in unreadable:
            problems.append(f"dkim: unusable key file, not signing with it: {line}")
    problems += [f"dkim: {line}" for line in keys.check(settings.data, scanned)
                 if line not in unusable]
    return problems


def check_aliases(settings: Settings) -> list[str]:
    if settings.users.database:
        return []               # check_directory asked the database
    path = settings.data / "users.sqlite"
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=STORE_TIMEOUT_S)
        try:
            rows = db.execute("SELECT a.local, a.domain FROM aliases a JOIN users u "
                              "ON u.domain=a.domain AND u.local=a.local ORDER BY 2, 1").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        return [f"users: {path}: {e}"]
    return [f"users: alias {lo}@{d} is also a user and is never used; `mailappliance alias del "
            f"{lo}@{d}`" for lo, d in rows]


# --- listeners ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bind:
    key: str            # listen.smtp
    text: str           # the endpoint string
    port: int | None    # TCP port (None for unix)
    host: str | None    # interface; "" = every address
    path: str | None    # unix socket path


def _param(text: str, name: str) -> str | None:
    m = re.search(rf"(?:^|(?<!\\):){name}=((?:\\.|[^:\\])*)", text)
    return m.group(1).replace("\\", "") if m else None


def binds(settings: Settings) -> list[Bind]:
    out = []
    listen = settings.listen
    for key in [f.name for f in __import__("dataclasses").fields(listen)]:
        for text in getattr(listen, key):
            kind = text.split(":", 1)[0]
            if kind == "unix":
                out.append(Bind(f"listen.{key}", text, None, None,
                                os.path.abspath(unix_path(text))))
            elif kind in ("tcp", "tcp6", "ssl"):
                port = text.split(":")[1].split("=")[0] if ":" in text else ""
                host = _param(text, "interface") or ""
                if port.isdigit():
                    out.append(Bind(f"listen.{key}", text, int(port), host, None))
    return out


def _overlap(a: str, b: str) -> bool:
    wild = ("", "0.0.0.0", "::")
    if a in wild or b in wild:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def check_listeners(settings: Settings) -> list[str]:
    problems = []
    bs = binds(settings)
    for i, a in enumerate(bs):
        for b in bs[i + 1:]:
            if a.path is not None and a.path == b.path:
                problems.append(f"{a.key} and {b.key}: both listen on the unix socket {a.path}")
            elif (a.port is not None and a.port == b.port and a.port != 0
                  and _overlap(a.host, b.host)):
                problems.append(f"{a.key} {a.text!r} and {b.key} {b.text!r}: both want port "
                                f"{a.port} on the same address")
    for text in settings.listen.inject:
        parent = Path(os.path.abspath(unix_path(text))).parent
        try:
            st = os.stat(parent)
        except OSError:
            continue            # made at start (systemd's RuntimeDirectory=, or the server)
        if not st.st_mode & stat.S_IXOTH:
            problems.append(f"listen.inject: the directory {parent} (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}) keeps other users from the "
                            "socket; they could not send mail (chmod o+x, or RuntimeDirectoryMode"
                            "=0755)")
    return problems


def run(settings: Settings, user_name: str | None = None) -> tuple[ServerUser, list[str]]:
    """Every check on loaded settings (loaded with check_files=False, so each file problem
    is reported here, one line each) -> (the server's user, the problems)."""
    user = server_user(settings, user_name)
    problems: list[str] = []
    problems += check_rules(settings, user)
    problems += check_tls(settings, user)
    problems += check_admin(settings, user)
    problems += check_data(settings, user)
    problems += check_listeners(settings)
    problems += check_aliases(settings)
    problems += check_directory(settings, user)
    problems += check_dkim(settings, user)
    return user, problems
