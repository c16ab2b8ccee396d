"""The `mailappliance` command: domains, users, aliases, and (through the admin protocol) the
running server. Exit status: 0 success, 1 refused (one line on stderr), 2 usage error, 78 no
instance where it looked (mailappliance/locate.py: --config, --data, MAILAPPLIANCE_CONFIG,
/etc/mailappliance/mailappliance.toml, ./var; only the commands in CREATING make a new one).

Passwords are read from stdin (--password-stdin) or prompted without echo; never from argv.
"""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import sys
from typing import Sequence

from mailappliance import __version__
from mailappliance.config import ConfigError, Settings, load_settings
from mailappliance.users.store import StoreError, UserStore, alias_line

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78
# The commands that may set up a new instance (create its data directory); every other one
# refuses with EXIT_CONFIG where there is none (DESIGN.md section 2).
CREATING = frozenset({("domain", "add"), ("user", "add"), ("alias", "add"), ("import", "qmail")})


class Refused(Exception):
    """A request the store or server refused; str() is the one stderr line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mailappliance", description="administer a mailappliance instance")
    p.add_argument("--version", action="version", version=f"mailappliance {__version__}")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data", "-d", help="state directory of the instance (default ./var)")
    where.add_argument("--config", "-c", help="the instance's TOML configuration file")
    sub = p.add_subparsers(dest="area", required=True, parser_class=_Parser)

    dom = sub.add_parser("domain", help="virtual domains").add_subparsers(dest="action",
                                                                          required=True)
    d_add = dom.add_parser("add", help="add a domain")
    d_add.add_argument("name")
    d_add.add_argument("--postmaster", help="user that receives postmaster/abuse/mailer-daemon "
                       "(default: the first user added)")
    d_del = dom.add_parser("del", help="delete a domain and its mailboxes (refused while they "
                           "hold mail, unless --force)")
    d_del.add_argument("name")
    d_del.add_argument("--force", action="store_true",
                       help="delete the mail in its mailboxes too")
    dom.add_parser("list", help="list domains")

    usr = sub.add_parser("user", help="virtual users").add_subparsers(dest="action", required=True)
    u_add = usr.add_parser("add", help="add a user with a Maildir")
    u_add.add_argument("address")
    u_add.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of stdin")
    u_add.add_argument("--quota", type=int, default=0, help="mailbox quota in bytes (0: none)")
    usr.add_parser("del", help="delete a user and its Maildir").add_argument("address")
    u_pw = usr.add_parser("passwd", help="change a user's password")
    u_pw.add_argument("address")
    u_pw.add_argument("--password-stdin", action="store_true")
    u_list = usr.add_parser("list", help="list users")
    u_list.add_argument("domain", nargs="?")

    ali = sub.add_parser("alias", help="aliases and forwards").add_subparsers(dest="action",
                                                                             required=True)
    a_add = ali.add_parser("add", help="map an address to one or more targets")
    a_add.add_argument("address")
    a_add.add_argument("targets", nargs="+")
    ali.add_parser("del", help="delete an alias").add_argument("address")
    ali.add_parser("list", help="list aliases")

    st = sub.add_parser("stat", help="services, uptime, connections, queue (server must run)")
    st.add_argument("--json", action="store_true", help="one JSON document")
    q = sub.add_parser("queue", help="the mail queue").add_subparsers(dest="action", required=True)
    q_ls = q.add_parser("list", help="queued messages, per recipient: state, attempts, last error")
    q_ls.add_argument("--json", action="store_true", help="one JSON object per message a line")
    q_ls.add_argument("--limit", type=int, help="messages per page (default 1000)")
    q_ls.add_argument("--after", help="start after this queue id (the next page)")
    q_ls.add_argument("--all", action="store_true", help="every page, one after the other")
    q.add_parser("show", help="envelope, states and header of a message").add_argument("id")
    q_fl = q.add_parser("flush", help="retry deferred recipients now")
    q_fl.add_argument("target", nargs="?", help="a queue id, or @DOMAIN (default: all)")
    q_rm = q.add_parser("remove", help="remove messages")
    q_rm.add_argument("id", nargs="+")
    q_rm.add_argument("--bounce", action="store_true", help="bounce them to the sender first")
    sub.add_parser("reload", help="re-read configuration and rules (like HUP)")
    r = sub.add_parser("relay", help="POP-before-SMTP grants").add_subparsers(dest="action",
                                                                            required=True)
    r.add_parser("list", help="current grants")
    from mailappliance.mailauth import command as dkim_command
    dkim_command.add_parser(sub)
    ck = sub.add_parser("check", help="offline configuration test: exit 0, or 1 with one line "
                        "per problem")
    ck.add_argument("--user", help="the user the server runs as (twistd --uid); default: the "
                    "owner of the data directory")
    imp = sub.add_parser("import", help="import another mail host").add_subparsers(
        dest="action", required=True)
    iq = imp.add_parser("qmail", help="carry over a qmail + vpopmail host (docs/MIGRATION.md)")
    iq.add_argument("--qmail", default="/var/qmail", help="qmail's directory (/var/qmail)")
    iq.add_argument("--vpopmail", default="/home/vpopmail",
                    help="vpopmail's directory (/home/vpopmail)")
    iq.add_argument("--tcp-rules", help="the tcprules source of tcp.smtp (/etc/tcp.smtp)")
    iq.add_argument("--link", action="store_true",
                    help="hard-link the Maildirs instead of moving them (same file system)")
    iq.add_argument("--dry-run", action="store_true", help="print the report, change nothing")
    sm = sub.add_parser("sendmail", help="sendmail-compatible injection", add_help=False)
    sm.add_argument("args", nargs=argparse.REMAINDER)
    return p


def settings_for(args: argparse.Namespace) -> Settings:
    """The instance's settings, found as locate.py says; NoInstance when a command that does
    not create one finds none."""
    from mailappliance.locate import locate, require_instance
    creating = (args.area, getattr(args, "action", None)) in CREATING
    found = locate(args.config, args.data, may_create=creating)
    overrides = {"data": str(found.data)} if found.data else {}
    settings = load_settings(found.config, overrides)
    # The store commands against a shared PostgreSQL directory work from any node, including
    # one whose server has not run yet: the data they change is in the database.
    shared = args.area in STORE_AREAS and bool(settings.users.database)
    if not creating and not shared:
        require_instance(settings.data, found)
    return settings


def run_check(args: argparse.Namespace) -> int:
    """`mailappliance check` (mailappliance/check.py): needs a configuration or a data
    directory to look at, not a working instance; every problem is one line on stderr."""
    from mailappliance import check
    from mailappliance.locate import NoInstance, locate
    try:
        found = locate(args.config, args.data)
    except NoInstance as e:
        print(f"mailappliance: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        overrides = {"data": str(found.data)} if found.data else {}
        settings = load_settings(found.config, overrides, check_files=False)
        user, problems = check.run(settings, args.user)
    except ConfigError as e:
        print(f"mailappliance: {e}", file=sys.stderr)
        return EXIT_REFUSED
    for line in problems:
        print(f"mailappliance: {line}", file=sys.stderr)
    if problems:
        return EXIT_REFUSED
    print(f"{found.how}: no problems found (data {settings.data}, server user {user})")
    return EXIT_OK


def read_password(from_stdin: bool, confirm: bool = True) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise Refused("no password on standard input")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise Refused("no terminal to prompt for the password: use --password-stdin")
    first = getpass.getpass("New password: ")
    if confirm and getpass.getpass("Retype new password: ") != first:
        raise Refused("passwords do not match")
    return first


# --- store-direct commands (server stopped, or the server delegates here) ----------------------

def _store_command(args: argparse.Namespace, store: UserStore, out) -> None:
    area, action = args.area, args.action
    if area == "domain":
        if action == "add":
            name = store.add_domain(args.name, args.postmaster)
            print(f"domain {name} added", file=out)
        elif action == "del":
            removed = store.del_domain(args.name, force=args.force)
            gone = f" with {removed} message{'s' * (removed != 1)}" if removed else ""
            print(f"domain {args.name.lower()} deleted{gone}", file=out)
        else:
            for name in store.list_domains():
                print(name, file=out)
    elif area == "user":
        if action == "add":
            password = read_password(args.password_stdin)
            user = store.add_user(args.address, password, args.quota)
            print(f"user {user.address} added", file=out)
        elif action == "passwd":
            password = read_password(args.password_stdin)
            store.set_password(args.address, password)
            print(f"password of {args.address.lower()} changed", file=out)
        elif action == "del":
            store.del_user(args.address)
            print(f"user {args.address.lower()} deleted", file=out)
        else:
            for user in store.list_users(args.domain):
                quota = f" quota={user.quota}" if user.quota else ""
                disabled = " disabled" if user.disabled else ""
                print(f"{user.address}{quota}{disabled}", file=out)
    elif area == "alias":
        if action == "add":
            store.add_alias(args.address, args.targets)
            print(f"alias {args.address.lower()} added", file=out)
        elif action == "del":
            store.del_alias(args.address)
            print(f"alias {args.address.lower()} deleted", file=out)
        else:
            shadowed = store.shadowed_aliases()
            for address, targets in store.list_aliases():
                print(alias_line(address, targets, shadowed), file=out)


STORE_AREAS = ("domain", "user", "alias")


def _describe_change(args: argparse.Namespace) -> str | None:
    """The change a store command makes, for the log (never a password); None for a list."""
    area, action = args.area, args.action
    if action == "list":
        return None
    words = [area, action, getattr(args, "name", None) or getattr(args, "address", "")]
    if area == "alias" and action == "add":
        words += list(args.targets)
    if getattr(args, "postmaster", None):
        words += ["--postmaster", args.postmaster]
    if getattr(args, "quota", 0):
        words += ["--quota", str(args.quota)]
    if getattr(args, "force", False):
        words.append("--force")
    return " ".join(words)


def _sendmail_split(argv: list[str]) -> int | None:
    """Index of a "sendmail" subcommand that follows only global options, else None."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "sendmail":
            return i
        if arg in ("--data", "-d", "--config", "-c"):
            i += 2
        elif arg.startswith(("--data=", "--config=")):
            i += 1
        else:
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # argparse.REMAINDER drops options such as "-i" or "-F NAME" after a subcommand, so the
    # sendmail arguments are split off by hand: [global options] sendmail [sendmail options].
    split = _sendmail_split(argv)
    args = parser.parse_args(argv if split is None else argv[:split + 1])
    if args.area == "sendmail":
        from mailappliance import sendmail
        extra = ["--data", args.data] if args.data else []
        extra += ["--config", args.config] if args.config else []
        return sendmail.main(extra + argv[split + 1:])
    if args.area == "check":
        return run_check(args)
    from mailappliance.locate import NoInstance
    settings = None
    try:
        try:
            settings = settings_for(args)
        except NoInstance as e:
            print(f"mailappliance: {e}", file=sys.stderr)
            return EXIT_CONFIG
        except ConfigError as e:
            if args.area == "reload":
                # The server parses the same file the same way; it would refuse it too.
                raise Refused(f"reload refused: {e}; the old configuration stays in force")
            raise
        if args.area == "import":
            # Runs as the invoking user (root, to read vpopmail's files and move them); what it
            # creates in the data directory goes to that directory's owner (migrate/execute.py).
            from mailappliance.migrate import command
            return command.run(args, settings)
        if args.area in STORE_AREAS:
            # Store commands always work directly on the store (the server, if running, sees
            # each change at once). Run as root, act as the data directory's owner, so the
            # Maildirs and SQLite files created here belong to the user the server runs as.
            from mailappliance import audit
            from mailappliance.privileges import drop_to_data_owner
            who = audit.caller()              # the real caller, before the switch
            drop_to_data_owner(settings.data)
            # [users] database: SQLite in the data directory, or the shared PostgreSQL (the
            # change counts on every node within its staleness bound).
            from mailappliance.users.backend import open_user_store
            store = open_user_store(settings)
            change = _describe_change(args)
            try:
                _store_command(args, store, sys.stdout)
            except StoreError as e:
                if change:
                    audit.record(settings, f"{who}: {change}: refused: {e}")
                raise
            finally:
                store.close()
            if change:
                audit.record(settings, f"{who}: {change}: ok")
            return EXIT_OK
        if args.area == "dkim":
            # Keys are files in the data directory, written as its owner (0600, 0700).
            from mailappliance.mailauth import command as dkim_command
            from mailappliance.mailauth.keys import DKIMKeyError
            from mailappliance.privileges import drop_to_data_owner
            drop_to_data_owner(settings.data)
            try:
                return dkim_command.run(args, settings, sys.stdout, sys.stderr)
            except DKIMKeyError as e:
                raise Refused(str(e)) from None
        try:
            from mailappliance.admin import client
        except ModuleNotFoundError:
            raise Refused("this command needs the admin protocol, which is not built in")
        return client.run(args, settings)
    except (StoreError, ConfigError, Refused) as e:
        print(f"mailappliance: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ImportError as e:
        # [users] database names PostgreSQL on a machine without its driver.
        print(f"mailappliance: users.database: {e.name or e}: not installed "
              "(pip install 'mailappliance[postgresql]')", file=sys.stderr)
        return EXIT_REFUSED
    except (OSError, sqlite3.Error) as e:
        # A full disk, a file of the wrong owner: the file and the system's words, one line.
        from mailappliance.datadir import describe
        store = settings.data / "users.sqlite" if settings is not None else None
        print(f"mailappliance: {describe(e, store)}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("mailappliance: interrupted", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
