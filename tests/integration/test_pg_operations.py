"""The operator's commands with `[users] database` a PostgreSQL URI (DESIGN.md 6, issue 23):
`mailappliance check` creates the schema on an empty database and reports a database it cannot
reach or a role that cannot create the schema in one line each, without the password; `import
qmail` writes the users into the shared database and their mail into the shared mailbox tree,
where a node started afterwards serves them with their old passwords.

Real parts: the session's private PostgreSQL cluster (tests/pg_support.py), the `mailappliance`
command, `twistd -n mailappliance`, poplib.
"""

from __future__ import annotations

import poplib
from pathlib import Path

from tests.integration.delivery_support import closed_port
from tests.integration.server import ServerProcess
from tests.pg_support import require_psycopg

require_psycopg(module_level=True)

from mailappliance.users import pgschema  # noqa: E402
from mailappliance.users.pgstore import PgUserStore  # noqa: E402
from tests.integration.test_import_qmail import import_cmd  # noqa: E402
from tests.qmail_tree import PASSWORD, sample_tree, sample_user, uidls  # noqa: E402

IO_TIMEOUT = 20


def node(root: Path, uri: str, mail: Path, hostname: str = "node-a.test") -> ServerProcess:
    """A node's configuration and data directory (0700, as `check` wants it); not started."""
    srv = ServerProcess(root, f'mailboxes = "{mail}"\n[users]\ndatabase = "{uri}"\n',
                        hostname=hostname)
    srv.root.mkdir(parents=True)
    srv.data.mkdir(mode=0o700)
    srv._write_config()
    return srv


def check_problems(srv: ServerProcess) -> list[str]:
    res = srv.cli("check", check=False)
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert all(line.startswith("mailappliance: ") for line in lines), res.stderr
    return lines


def test_check_creates_the_schema_and_reports_database_problems_in_one_line(
        pg_database, tmp_path):
    cluster, dbname = pg_database
    mail = tmp_path / "mail"
    mail.mkdir()
    a = node(tmp_path / "a", cluster.uri(dbname), mail)
    res = a.cli("check")
    assert "no problems found" in res.stdout, res.stderr
    with cluster.admin(dbname) as conn:
        versions = conn.execute("SELECT version FROM mailappliance.schema_version").fetchall()
    assert versions == [(v,) for v, _ in pgschema.MIGRATIONS]

    secret = "Sekrit-pw-99"
    down = node(tmp_path / "b", f"postgresql://mailappliance:{secret}@127.0.0.1:"
                f"{closed_port()}/{dbname}", mail, hostname="node-b.test")
    lines = check_problems(down)
    assert len(lines) == 1 and lines[0].startswith("mailappliance: users.database: database "
                                                   "postgresql://mailappliance@127.0.0.1:"), lines
    assert "Connection refused" in lines[0]
    assert secret not in down.cli("check", check=False).stderr

    # A role with no right to create the schema, on an empty database: what to do, one line.
    empty = cluster.create_database()
    try:
        with cluster.admin() as conn:
            conn.execute("DROP ROLE IF EXISTS reader")
            conn.execute("CREATE ROLE reader LOGIN PASSWORD 'reader-pw-1'")
        c = node(tmp_path / "c", cluster.uri(empty, user="reader", password="reader-pw-1"),
                 mail, hostname="node-c.test")
        lines = check_problems(c)
        assert len(lines) == 1 and "cannot create schema mailappliance" in lines[0], lines
        assert "run it once with a role that owns the database" in lines[0]
    finally:
        cluster.drop_database(empty)


def test_import_qmail_fills_the_shared_database_and_mailbox_tree_served_by_every_node(
        pg_database, tmp_path):
    cluster, dbname = pg_database
    uri = cluster.uri(dbname)
    mail = tmp_path / "mail"
    mail.mkdir()
    tree = sample_tree(tmp_path / "old-host")
    a = node(tmp_path / "a", uri, mail)
    res = import_cmd(a.config_path, tree, "--link")
    assert res.returncode == 1, res.stdout + res.stderr     # the sample's malformed vpasswd line
    assert not (a.data / "users.sqlite").exists(), "the import wrote the local SQLite store"

    store = PgUserStore(uri, mail, 4)
    try:
        in_db = {u.address for u in store.list_users()}
        expected = {f"{u.name}@{d.name}" for d in tree.domains for u in d.users
                    if u.scheme != "unknown"}
        assert expected <= in_db, expected - in_db
        address = "bob@example.com"
        assert not store.get_user(address).password_hash.startswith("$2")  # the old hash
        local, domain = address.split("@")
        assert store.maildir_for(local, domain).is_relative_to(mail)
    finally:
        store.close()

    # A second node, configured after the import, serves the user from the shared tree.
    b = node(tmp_path / "b", uri, mail, hostname="node-b.test")
    b.start()
    try:
        pop = poplib.POP3("127.0.0.1", b.port("pop3"), timeout=IO_TIMEOUT)
        try:
            pop.user(address)
            assert pop.pass_(PASSWORD).startswith(b"+OK")
            listed = sorted(line.split()[1].decode() for line in pop.uidl()[1])
        finally:
            pop.quit()
        assert listed == uidls(sample_user(tree, address))
    finally:
        b.stop()
    assert "no problems found" in b.cli("check").stdout
