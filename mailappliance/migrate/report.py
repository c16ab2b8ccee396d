"""The report of `mailappliance import qmail` (a pure core: Plan + Outcome in, text out).

It says what was imported, what was not and why (file and line), and ends with what the
operator must still do. A dry run prints the same report in the conditional.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailappliance.migrate.execute import MailStats, Outcome
from mailappliance.migrate.qmailfiles import Note
from mailappliance.migrate.source import Plan

SECTIONS = (("error", "Errors (run the import again once they are fixed)"),
            ("skipped", "Not carried over"),
            ("warning", "Carried over with a difference"),
            ("info", "Remarks"))


@dataclass
class Files:
    """Where the configuration to review and the rules copy went (or would go)."""
    config: Path | None
    config_reused: bool
    rules: Path | None
    rules_reused: bool
    toml: str
    data_owned_by_root: bool = True


def _n(number: int) -> str:
    return f"{number:,}"


def _count(number: int, word: str) -> str:
    return f"{number:,} {word}{'' if number == 1 else 's'}"


def _mail(stats: MailStats | None) -> str:
    if stats is None:
        return ""
    count = stats.messages + stats.present
    if not count and not stats.present:
        return "no mail"
    text = f"{_count(count, 'message')}, {_n(stats.bytes)} bytes"
    if stats.present:
        text += f" ({_n(stats.present)} already in place)"
    return text


def render(plan: Plan, outcome: Outcome, files: Files, notes: list[Note], data: Path) -> str:
    dry = outcome.dry_run
    verb = ("would be " if dry else "")
    action = "hard-linked" if outcome.link else "moved"
    if outcome.cross_device and not outcome.link:
        action = "copied across file systems, then removed from the old tree"
    out: list[str] = []
    w = out.append
    w("mailappliance import qmail" + (": DRY RUN, nothing was changed" if dry else ""))
    w(f"  qmail     {plan.qmail}")
    w(f"  vpopmail  {plan.vpopmail}")
    w(f"  rules     {plan.rules_source or '(none found)'}")
    w(f"  data      {data}   (mailboxes {verb}{action})")
    w("")

    def state(value: str | None) -> str:
        if value is None:
            return "not imported"
        if value in ("added", "set"):
            return f"{'to add' if dry else 'added'}"
        return "already there"

    w(f"Domains ({len(plan.domains)})")
    for d in plan.domains:
        w(f"  {d.name:<32} {state(outcome.domains.get(d.name)):<14} "
          f"{len(d.users)} users, {len(d.aliases)} aliases")
    w("")
    users = plan.users
    w(f"Users ({len(users)})")
    width = max([len(u.address) for u in users] + [20])
    for u in users:
        kind = {"clear": "clear text -> bcrypt"}.get(u.kind, u.kind)
        if u.kind == "disabled":
            kind = f"DISABLED: {u.disabled_reason}"
        quota = f"quota {_n(u.quota)}" if u.quota else "no quota"
        w(f"  {u.address:<{width}} {state(outcome.users.get(u.address)):<14} {kind}; {quota}; "
          f"{_mail(outcome.mail.get(u.address)) or 'no mail'}")
    w("")
    aliases = plan.aliases
    w(f"Aliases ({len(aliases)})")
    for a in aliases:
        w(f"  {a.address} -> {', '.join(a.targets)}   "
          f"[{state(outcome.aliases.get(a.address))}; {a.where}]")
    w("")
    w("Mail")
    t = outcome.total
    w(f"  {_count(t.messages, 'message')}, {_n(t.bytes)} bytes {verb}{action}"
      + (f"; {_n(t.present)} already in place" if t.present else ""))
    if t.other_files:
        w(f"  {_n(t.other_files)} other Maildir files (maildirsize, folder state) {verb}{action}")
    if t.tmp_left:
        w(f"  {_count(t.tmp_left, 'unfinished delivery')} in tmp/ left in the old tree"
          .replace("deliverys", "deliveries"))
    w("  file names kept: POP3 UIDLs stay the same; new/, cur/ and flags keep their meaning")
    w("")
    w("Configuration")
    if files.config is not None:
        how = ("already written by an earlier run" if files.config_reused
               else ("would be written" if dry else "written"))
        w(f"  {files.config}: {how}; review it, then install it")
    for line in files.toml.rstrip("\n").splitlines():
        w(f"  | {line}")
    w("")
    w("Rules")
    if plan.rules is None:
        w("  no tcprules source: no rules file")
    else:
        r = plan.rules
        how = ("already there" if files.rules_reused
               else ("would be copied to" if dry else "copied to"))
        w(f"  {plan.rules_source}: {_count(r.rules, 'rule')}, "
          f"{_count(len(r.refused), 'line')} commented out; "
          f"{how} {files.rules}")
    w("")
    for kind, title in SECTIONS:
        items = [n for n in notes if n.kind == kind]
        if not items:
            continue
        w(f"{title} ({len(items)})")
        for n in items:
            w(f"  {n.line()}")
        w("")
    errors = sum(1 for n in notes if n.kind == "error")
    counts = {k: sum(1 for v in getattr(outcome, k).values() if v in ("added", "set"))
              for k in ("domains", "users", "aliases")}
    disabled = sum(1 for u in users if u.kind == "disabled")
    w(f"Summary: {_count(counts['domains'], 'domain')}, {_count(counts['users'], 'user')} "
      f"({disabled} disabled), {_count(counts['aliases'], 'alias')} "
      f"{'to add' if dry else 'added'}; {_count(t.messages, 'message')} {verb}{action}; "
      f"{_count(errors, 'error')}".replace("aliass", "aliases"))
    w("")
    w("What you must still do")
    for i, step in enumerate(todo(plan, outcome, files, notes, data), 1):
        w(f"  {i}. {step}")
    return "\n".join(out) + "\n"


def todo(plan: Plan, outcome: Outcome, files: Files, notes: list[Note], data: Path) -> list[str]:
    steps = []
    dry = outcome.dry_run
    if dry:
        steps.append("Run the same command without --dry-run to import.")
    errors = sum(1 for n in notes if n.kind == "error")
    if errors:
        steps.append(f"Fix the {_count(errors, 'error')} listed above and run the import again: it "
                     "goes on where it stopped and duplicates no user and no message.")
    disabled = [u.address for u in plan.users if u.kind == "disabled"]
    if disabled:
        shown = ", ".join(disabled[:5]) + (", ..." if len(disabled) > 5 else "")
        steps.append(f"Set a password for the {_count(len(disabled), 'disabled user')} ({shown}): "
                     "`mailappliance user passwd ADDRESS`.")
    skipped = sum(1 for n in notes if n.kind == "skipped")
    if skipped:
        steps.append(f"Decide about the {_count(skipped, 'item')} not carried over (program "
                     "deliveries, per-user forwards, catch-alls): `mailappliance alias add` "
                     "where an alias will do.")
    if files.config is not None:
        steps.append(f"Review {files.config} and install it as "
                     "/etc/mailappliance/mailappliance.toml (the systemd unit's --config).")
    steps.append("Let qmail empty its queue (`qmailctl flush`; `qmail-qstat` says 0), then "
                 "stop qmail-smtpd, qmail-send and qmail-pop3d (`svc -d /service/qmail-*`) and "
                 "remove their /service links so they do not come back at boot.")
    steps.append("Run the import again once qmail is stopped: it carries over only the mail "
                 "that arrived meanwhile.")
    steps.append("Start mailappliance: install conf/mailappliance.service as "
                 "/etc/systemd/system/mailappliance.service, `systemctl enable --now "
                 "mailappliance`; `mailappliance stat` shows it running.")
    if files.data_owned_by_root:
        steps.append(f"Make the data directory belong to the server's user (`chown -R "
                     f"mailappliance: {data}`): the server never changes the owner of a data "
                     "directory it finds.")
    steps.append("DNS: keep the MX and A records if this host keeps its address; otherwise "
                 "point them (and the PTR record and SPF) at it. `mailappliance dkim keygen "
                 "DOMAIN` prints the DKIM TXT record to publish for each domain.")
    steps.append("Check: a POP3 login and a test message per domain (`swaks --to "
                 "user@domain --server HOST`); users keep their passwords and no client "
                 "downloads its mail again.")
    if outcome.link:
        steps.append(f"When you are satisfied, remove the old tree ({plan.vpopmail}/domains): "
                     "with --link each message has two names until then.")
    return steps
