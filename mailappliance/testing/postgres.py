"""A private PostgreSQL cluster for tests and benchmarks (Debian's `postgresql` package).

`initdb` into a temporary directory, its own unix socket directory there, TCP on 127.0.0.1
only with a port picked free, no system service touched. initdb and pg_ctl refuse to run as
root: run as root, they run as the `postgres` user (`runuser`), which Debian's package
creates. A cluster is up in about 1.5 s: start one per test session; a database per test is
a CREATE DATABASE (tens of milliseconds).

The cluster has a superuser `postgres` (trust, unix socket only) for housekeeping and a login
role `mailappliance` with a password (scram-sha-256 over TCP) that owns each database made
by `create_database`, as an operator would set it up for the product.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

APP_ROLE = "mailappliance"
SUPERUSER = "postgres"
# pg_ctl -w waits this long for the server to accept connections (it is ~1.5 s here).
START_TIMEOUT = 60


class ClusterUnavailable(Exception):
    """No PostgreSQL server binaries here (the `postgresql` package is not installed)."""


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/N/bin with initdb, or $MAILAPPLIANCE_PG_BINDIR."""
    env = os.environ.get("MAILAPPLIANCE_PG_BINDIR")
    candidates = [env] if env else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
        if p.split("/")[-2].isdigit() else 0, reverse=True)
    for d in candidates:
        if d and os.access(os.path.join(d, "initdb"), os.X_OK):
            return Path(d)
    raise ClusterUnavailable("PostgreSQL server binaries not found (apt-get install postgresql)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    def __init__(self, *, fsync: bool = False, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="mailappliance-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = 0
        self.password = secrets.token_urlsafe(12)
        self._as_root = os.geteuid() == 0
        self._counter = 0

    # -- running the server binaries as a user they accept ------------------------------------
    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", SUPERUSER, "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True,
                              cwd=self.root, timeout=START_TIMEOUT + 30)

    def init(self) -> None:
        self.sockets.mkdir()
        if self._as_root:
            shutil.chown(self.root, SUPERUSER)
            shutil.chown(self.sockets, SUPERUSER)
            os.chmod(self.root, 0o755)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(pwfile, SUPERUSER)
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-E", "UTF8",
                      "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
                      "--pwfile", str(pwfile))
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"initdb failed: {e.stderr.strip() or e.stdout.strip()}") from None
        finally:
            pwfile.unlink()
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.sockets}'",
            "max_connections = 200",
            "shared_buffers = 32MB",
            f"fsync = {'on' if self.fsync else 'off'}",
            f"synchronous_commit = {'on' if self.fsync else 'off'}",
            f"full_page_writes = {'on' if self.fsync else 'off'}",
            "log_min_messages = warning",
        ]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# mailappliance tests\n" + "\n".join(conf) + "\n")
        with open(self.data / "pg_hba.conf", "w") as f:
            f.write("local all postgres trust\n"
                    "local all all scram-sha-256\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")

    def start(self) -> None:
        """Start (or restart after `stop`) the server on a free port (the same one again on a
        restart when it is still free)."""
        if not self.data.exists():
            self.init()
        last = ""
        for _ in range(3):           # a port taken between free_port() and the bind
            port = self.port or free_port()
            r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                          "-t", str(START_TIMEOUT), "-o", f"-p {port}", "start", check=False)
            if r.returncode == 0:
                self.port = port
                break
            last = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            self.port = 0
        else:
            raise RuntimeError(f"PostgreSQL did not start: {last.strip()}")
        if not getattr(self, "_role_made", False):
            with self.admin() as conn:
                conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{self.password}'")
            self._role_made = True

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ----------------------------------------------------------------------------
    def admin(self, dbname: str = "postgres"):
        import psycopg
        return psycopg.connect(host=str(self.sockets), port=self.port, user=SUPERUSER,
                               dbname=dbname, autocommit=True)

    def create_database(self, name: str | None = None, owner: str = APP_ROLE) -> str:
        if name is None:
            self._counter += 1
            name = f"t{os.getpid()}_{self._counter}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def uri(self, dbname: str, user: str = APP_ROLE, password: str | None = "") -> str:
        """A libpq URI over TCP on 127.0.0.1; password "" = the role's, None = none (then
        libpq looks in PGPASSFILE)."""
        if password == "":
            password = self.password
        auth = quote(user) + (f":{quote(password)}" if password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(dbname)}"
