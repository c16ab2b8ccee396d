"""The importer on a synthetic qmail + vpopmail tree, in-process: what the plan reads, what the
executor writes (names, inodes, owners), idempotence, dry run, bad input, the configuration it
writes and the report."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tomllib
from pathlib import Path

import pytest

from mailappliance.config import load_settings
from mailappliance.migrate import command, source, toml_out
from mailappliance.users import passwords
from mailappliance.users.store import UserStore
from tests.qmail_tree import (
    PASSWORD, TDomain, TUser, Msg, sample_tree, sample_user, uidls, write_tree)

NOBODY = 65534


@pytest.fixture
def tree(tmp_path):
    return sample_tree(tmp_path / "src")


def plan_of(tree):
    return source.read_source(tree.qmail, tree.vpopmail, tree.tcp_rules, True)


def notes_about(notes, text):
    return [n for n in notes if text in n.text or text in n.where]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: (kind, size, mtime, inode, owner)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino,
                                             st.st_uid)
    return out


# --- the plan ---------------------------------------------------------------------------------

def test_plan_reads_domains_users_hash_kinds_quotas_and_aliases(tree):
    plan = plan_of(tree)
    assert [d.name for d in plan.domains] == ["example.com", "example.net"]
    users = {u.address: u for u in plan.users}
    assert {a: u.kind for a, u in users.items()} == {
        "postmaster@example.com": "md5-crypt", "alice@example.com": "md5-crypt",
        "bob@example.com": "sha512-crypt", "carol@example.com": "sha256-crypt",
        "dave@example.com": "des-crypt", "erin@example.com": "clear",
        "frank@example.com": "disabled", "grace@example.com": "sha512-crypt",
        "postmaster@example.net": "sha512-crypt", "heidi@example.net": "md5-crypt"}
    assert users["alice@example.com"].quota == 5242880
    assert users["carol@example.com"].quota == 10 * 1024 * 1024
    assert users["erin@example.com"].password_hash == "" and users["erin@example.com"].clear
    assert users["frank@example.com"].password_hash.startswith(passwords.DISABLED_PREFIX)
    # Paths of the old host (/home/vpopmail/...) are found under --vpopmail, hashed dirs too.
    assert users["grace@example.com"].maildir == \
        tree.vpopmail / "domains/example.com/0/grace/Maildir"
    assert {a.address: a.targets for a in plan.aliases} == {
        "sales@example.com": ["alice@example.com", "bob@example.com"],
        "info@example.com": ["carol@example.com"],
        "first.last@example.com": ["alice@example.com"]}


def test_plan_reports_what_it_cannot_carry_with_file_and_line(tree):
    notes = plan_of(tree).notes
    vpasswd = tree.domain_dir("example.com") / "vpasswd"
    broken = notes_about(notes, "malformed vpasswd line")
    assert [(n.kind, n.where) for n in broken] == [("error", f"{vpasswd}:9")]
    program = notes_about(notes, "ezmlm-send")
    assert program[0].kind == "skipped"
    assert program[0].where == f"{tree.domain_dir('example.com') / '.qmail-list'}:1"
    forward = notes_about(notes, "forward to bob@elsewhere.example.org")
    assert forward[0].where.endswith("example.com/bob/.qmail:1")
    assert notes_about(notes, "alias domain")[0].kind == "skipped"
    assert notes_about(notes, "help-default")[0].kind == "skipped"
    assert notes_about(notes, "both a user and this alias file")
    assert notes_about(notes, "backup.example.org")[0].kind == "skipped"
    assert notes_about(notes, "badmailfrom")[0].kind == "skipped"
    assert notes_about(notes, "NO_POP")[0].where == f"{vpasswd}:5"
    frank = notes_about(notes, "frank@example.com")
    assert "DISABLED" in frank[0].text and frank[0].where == f"{vpasswd}:7"
    assert notes_about(notes, "deleted mail for unknown users")
    # bounce-no-mailbox is what mailappliance does anyway: nothing to say.
    assert not notes_about(notes, "bounce-no-mailbox")


def test_missing_directories_refuse_the_import(tmp_path):
    (tmp_path / "qmail").mkdir()
    with pytest.raises(source.SourceError, match="--vpopmail .*: no such directory"):
        source.read_source(tmp_path / "qmail", tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(source.SourceError, match="--qmail .*: not a directory"):
        source.read_source(tmp_path / "file", tmp_path / "qmail")


def test_unreadable_vpasswd_is_an_error_and_the_other_domains_still_import(tree):
    vpasswd = tree.domain_dir("example.net") / "vpasswd"
    vpasswd.unlink()
    vpasswd.mkdir()                      # reading a directory fails, as root too
    plan = plan_of(tree)
    assert [n.kind for n in notes_about(plan.notes, str(vpasswd))] == ["error"]
    assert [d.name for d in plan.domains] == ["example.com", "example.net"]
    assert not plan.domains[1].users and len(plan.domains[0].users) == 8


def test_missing_vpasswd_beside_its_cdb_says_so(tree):
    (tree.domain_dir("example.net") / "vpasswd").unlink()
    notes = notes_about(plan_of(tree).notes, "vpasswd.cdb")
    assert notes and notes[0].kind == "error"


def test_without_assign_and_virtualdomains_domains_come_from_the_vpopmail_tree(tree):
    (tree.qmail / "users" / "assign").unlink()
    (tree.qmail / "control" / "virtualdomains").unlink()
    plan = plan_of(tree)
    assert [d.name for d in plan.domains] == ["example.com", "example.net"]
    assert len(plan.users) == 10


# --- the configuration file ---------------------------------------------------------------------

def test_the_written_configuration_loads_and_says_what_qmail_said(tree, tmp_path):
    plan = plan_of(tree)
    rules = tmp_path / "rules"
    rules.write_text(plan.rules.text)
    text, notes = toml_out.render(plan.control, tmp_path / "data", rules,
                                  [d.name for d in plan.domains])
    path = tmp_path / "imported.toml"
    path.write_text(text)
    s = load_settings(path)
    assert s.hostname == "mail.example.com" and s.default_domain == "example.com"
    assert s.smtp.databytes == 20000000 and s.smtp.timeout == 600
    assert s.smtp.rules == rules and s.rules.lookup("127.0.0.1").env["RELAYCLIENT"] == ""
    assert (s.queue.concurrency_local, s.queue.concurrency_remote) == (5, 40)
    assert s.queue.lifetime_days == 4
    assert s.route_for("example.org").host == "smarthost.example.org"
    assert s.route_for("example.org").port == 2525
    assert (s.route_for("lists.example.org").host, s.route_for("lists.example.org").port) == \
        ("127.0.0.1", 2526)
    assert s.route_for("a.example.info").host == "relay.example.info"
    assert s.listen.smtp == ("tcp:25",) and s.listen.pop3 == ("tcp:110",)
    assert s.data == tmp_path / "data"


def test_configuration_edge_values(tmp_path):
    c = source.ControlValues(me="mx.example.com", databytes=0, concurrency_remote=5000,
                             queuelifetime=90000, default_domain="other.example",
                             default_domain_source="defaultdomain")
    text, notes = toml_out.render(c, tmp_path, None, ["example.com"])
    table = tomllib.loads(text)
    assert "databytes" not in table["smtp"] and "default_domain" not in table
    assert table["queue"] == {"concurrency_remote": 1000, "lifetime_days": 2}
    assert {n.kind for n in notes} == {"info", "warning", "skipped"}


# --- the executor -------------------------------------------------------------------------------

def run_import(tree, data: Path, *, link=False, dry_run=False, config=None, env_kill=None):
    args = argparse.Namespace(qmail=str(tree.qmail), vpopmail=str(tree.vpopmail),
                              tcp_rules=str(tree.tcp_rules), link=link, dry_run=dry_run)
    settings = load_settings(config, {} if config else {"data": str(data)})
    settings = settings.__class__(**{**settings.__dict__, "bcrypt_cost": 4})
    out, err = io.StringIO(), io.StringIO()
    rc = command.run(args, settings, out, err)
    return rc, out.getvalue(), err.getvalue()


def test_link_import_keeps_names_inodes_and_mtimes_and_leaves_the_old_tree(tree, tmp_path):
    before = snapshot(tree.vpopmail)
    data = tmp_path / "data"
    rc, report, err = run_import(tree, data, link=True)
    assert rc == 1 and "found 1 error " in err          # the malformed vpasswd line
    assert snapshot(tree.vpopmail).keys() == before.keys()
    alice = sample_user(tree, "alice@example.com")
    src = tree.user_dir("example.com", alice) / "Maildir"
    dst = data / "domains/example.com/alice/Maildir"
    for m in alice.messages:
        if m.folder == "tmp":
            assert not (dst / "tmp" / m.name).exists()
            continue
        a, b = os.stat(src / m.folder / m.name), os.stat(dst / m.folder / m.name)
        assert (a.st_ino, a.st_mtime_ns) == (b.st_ino, b.st_mtime_ns)
    store = UserStore(data)
    try:
        assert len(store.list_users()) == 10
        assert store.get_user("frank@example.com").disabled
        erin = store.get_user("erin@example.com")
        assert erin.password_hash.startswith("$2")
        assert passwords.verify_password("Clear-text9", erin.password_hash)
        assert store.get_user("alice@example.com").password_hash == \
            tree.domain_dir("example.com").joinpath("vpasswd").read_text().split("\n")[1].split(":")[1]
        assert store.get_alias("sales@example.com") == ["alice@example.com", "bob@example.com"]
        # The role aliases go to the postmaster user, not to the first user in vpasswd order.
        assert store.get_alias("postmaster@example.net") is None
        assert store.get_alias("abuse@example.net") == ["postmaster@example.net"]
        assert store.get_alias("abuse@example.com") == ["postmaster@example.com"]
    finally:
        store.close()
    assert "Clear-text9" not in (data / "users.sqlite").read_bytes().decode("latin-1")


def test_move_import_empties_the_old_maildirs_except_tmp(tree, tmp_path):
    data = tmp_path / "data"
    run_import(tree, data)
    for d in tree.domains:
        for u in d.users:
            md = tree.user_dir(d.name, u) / "Maildir"
            left = sorted(p.name for p in md.rglob("*") if p.is_file())
            assert left == sorted(m.name for m in u.messages if m.folder == "tmp")
            dst = data / "domains" / d.name / u.name / "Maildir"
            names = sorted(p.name.split(":")[0] for s in ("new", "cur")
                           for p in (dst / s).iterdir())
            assert names == uidls(u)


def test_a_second_run_changes_nothing_and_duplicates_nothing(tree, tmp_path):
    data = tmp_path / "data"
    run_import(tree, data, link=True)
    first = snapshot(data)
    rc, report, _ = run_import(tree, data, link=True)
    second = snapshot(data)
    assert first.keys() == second.keys()
    changed = [k for k in first if first[k] != second[k] and not k.startswith("users.sqlite")]
    assert changed == []
    assert "0 domains, 0 users (1 disabled), 0 aliases added; 0 messages hard-linked" in report
    assert "already written by an earlier run" in report
    assert sorted(p.name for p in data.glob("qmail-import*")) == [
        "qmail-import.tcp.smtp", "qmail-import.toml"]


def test_dry_run_writes_nothing_anywhere(tree, tmp_path):
    before = snapshot(tree.root)
    data = tmp_path / "data"
    rc, report, _ = run_import(tree, data, dry_run=True)
    assert snapshot(tree.root) == before
    assert not data.exists()
    assert report.startswith("mailappliance import qmail: DRY RUN, nothing was changed")
    assert "10 messages, 2,310 bytes would be moved" in report
    assert "Run the same command without --dry-run" in report


def test_files_are_never_overwritten(tree, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "qmail-import.toml").write_text("# the operator's own file\n")
    run_import(tree, data, link=True)
    assert (data / "qmail-import.toml").read_text() == "# the operator's own file\n"
    assert load_settings(data / "qmail-import-2.toml").smtp.databytes == 20000000


def test_toml_goes_next_to_the_config_given(tree, tmp_path):
    conf = tmp_path / "etc" / "mailappliance.toml"
    conf.parent.mkdir()
    conf.write_text(f'data = "{tmp_path / "var"}"\nbcrypt_cost = 4\n')
    rc, report, _ = run_import(tree, None, link=True, config=conf)
    assert (conf.parent / "qmail-import.toml").is_file()
    assert (conf.parent / "qmail-import.tcp.smtp").is_file()
    assert (tmp_path / "var" / "users.sqlite").is_file()


def test_a_different_file_at_the_destination_is_left_alone_and_reported(tree, tmp_path):
    data = tmp_path / "data"
    heidi = sample_user(tree, "heidi@example.net")
    dst = data / "domains/example.net/heidi/Maildir/new"
    dst.mkdir(parents=True)
    (dst / heidi.messages[0].name).write_bytes(b"someone else's file\n")
    rc, report, _ = run_import(tree, data, link=True)
    assert (dst / heidi.messages[0].name).read_bytes() == b"someone else's file\n"
    assert "a different file of that name is already there" in report


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership changes need root")
def test_run_as_root_everything_created_belongs_to_the_data_directorys_owner(tree, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    run_import(tree, data, link=True)
    wrong = [k for k, v in snapshot(data).items() if v[4] != NOBODY]
    assert wrong == []


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or
                    os.stat("/dev/shm").st_dev == os.stat(os.getcwd()).st_dev,
                    reason="needs a second file system (/dev/shm)")
def test_move_across_file_systems_copies_then_removes(tree, tmp_path):
    import tempfile
    data = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="import-test-"))
    try:
        rc, report, err = run_import(tree, data / "var", link=True)
        assert rc == 1 and "--link needs" in err and not (data / "var").exists()
        heidi = sample_user(tree, "heidi@example.net")
        dst = data / "var/domains/example.net/heidi/Maildir"
        src = tree.user_dir("example.net", heidi) / "Maildir"
        before = {m.name: ((src / m.folder / m.name).read_bytes(),
                           (src / m.folder / m.name).stat().st_mtime_ns) for m in heidi.messages}
        rc, report, _ = run_import(tree, data / "var")
        assert "copied across file systems" in report
        for m in heidi.messages:
            st = (dst / m.folder / m.name).stat()
            assert ((dst / m.folder / m.name).read_bytes(), st.st_mtime_ns) == before[m.name]
            assert not (src / m.folder / m.name).exists()
        assert list((dst / "tmp").iterdir()) == []
        rc, report, _ = run_import(tree, data / "var")
        assert "\n  0 messages, 0 bytes moved" in report
    finally:
        shutil.rmtree(data)


def test_names_too_long_for_a_uidl_are_reported(tmp_path):
    long_name = "1700000000." + "x" * 80 + ".host"
    t = write_tree(tmp_path / "src", [TDomain("example.com", [
        TUser("joe", messages=[Msg("new", long_name), Msg("new", "1700000001.1.host")])])],
        control={"me": "mx.example.com\n"}, tcp_rules=":allow\n")
    rc, report, _ = run_import(t, tmp_path / "data", link=True)
    assert rc == 0, report
    assert "1 message names are longer than POP3's 70-character UIDL" in report


def test_report_sections_and_what_remains_to_do(tree, tmp_path):
    rc, report, _ = run_import(tree, tmp_path / "data", link=True)
    for title in ("Domains (2)", "Users (10)", "Aliases (3)", "Mail", "Configuration", "Rules",
                  "Errors", "Not carried over", "Carried over with a difference",
                  "What you must still do"):
        assert f"\n{title}" in report, title
    todo = report.split("What you must still do\n", 1)[1]
    assert "mailappliance user passwd" in todo and "DNS" in todo and "svc -d" in todo
    assert "systemctl enable" in todo and report.rstrip().endswith(todo.rstrip())
    assert PASSWORD not in report and "Clear-text9" not in report


def test_bad_sources_refuse_with_one_line_and_write_nothing(tree, tmp_path):
    data = tmp_path / "data"
    args = argparse.Namespace(qmail=str(tmp_path / "no-qmail"), vpopmail=str(tree.vpopmail),
                              tcp_rules=None, link=False, dry_run=False)
    settings = load_settings(None, {"data": str(data)})
    out, err = io.StringIO(), io.StringIO()
    assert command.run(args, settings, out, err) == 1
    assert err.getvalue().count("\n") == 1 and "--qmail" in err.getvalue()
    args.qmail, args.tcp_rules = str(tree.qmail), str(tmp_path / "no-rules")
    err = io.StringIO()
    assert command.run(args, settings, out, err) == 1
    assert err.getvalue() == f"mailappliance: --tcp-rules {tmp_path / 'no-rules'}: no such file\n"
    assert out.getvalue() == "" and not data.exists()


def test_a_half_finished_cross_device_copy_is_completed_not_duplicated(tree, tmp_path):
    """The state a kill leaves between giving the copy its name and removing the old file."""
    import tempfile
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system (/dev/shm)")
    data = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="import-test-")) / "var"
    try:
        heidi = sample_user(tree, "heidi@example.net")
        m = heidi.messages[0]
        src = tree.user_dir("example.net", heidi) / "Maildir" / m.folder / m.name
        dst = data / "domains/example.net/heidi/Maildir" / m.folder / m.name
        dst.parent.mkdir(parents=True)
        shutil.copy2(src, dst)
        rc, report, _ = run_import(tree, data)
        assert not src.exists() and dst.exists()
        assert "(1 already in place)" in report
        assert sorted(os.listdir(dst.parent)) == [m.name]
    finally:
        shutil.rmtree(data.parent)


def test_role_named_users_keep_their_mailboxes(tmp_path):
    """vpopmail domains may have real abuse@ and mailer-daemon@ mailboxes: they are imported as
    users (an address is a user or an alias, never both), the other role names as aliases."""
    t = write_tree(tmp_path / "src", [TDomain("example.com", [
        TUser("zed"), TUser("abuse", messages=[Msg("new", "1700000000.1.host")]),
        TUser("postmaster")])], control={"me": "mx.example.com\n"}, tcp_rules=":allow\n")
    rc, report, _ = run_import(t, tmp_path / "data", link=True)
    assert rc == 0, report
    store = UserStore(tmp_path / "data")
    try:
        assert {u.local for u in store.list_users()} == {"zed", "abuse", "postmaster"}
        assert store.get_alias("abuse@example.com") is None
        assert store.get_alias("mailer-daemon@example.com") == ["postmaster@example.com"]
        assert store.check_password("abuse@example.com", PASSWORD) is not None
    finally:
        store.close()
    rc, report, _ = run_import(t, tmp_path / "data", link=True)
    assert rc == 0 and "0 users (0 disabled)" in report
