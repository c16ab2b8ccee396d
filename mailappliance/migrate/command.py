"""`mailappliance import qmail [--qmail DIR] [--vpopmail DIR] [--tcp-rules FILE] [--link]
[--dry-run]`: read the old host, write the configuration to review and the rules copy
(never over an existing file), import domains, users, aliases and Maildirs, print the report.

Exit status: 0 when everything readable was imported (items not carried over by design are
listed, not counted as failures), 1 when the source cannot be read at all or some step
failed (the report lists each; running the command again finishes the job).
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

from mailappliance.config import ConfigError, Settings, load_settings
from mailappliance.migrate import execute, report, source, toml_out
from mailappliance.migrate.qmailfiles import Note
from mailappliance.privileges import adopt, data_owner

CONFIG_NAME = ("qmail-import", ".toml")
RULES_NAME = ("qmail-import", ".tcp.smtp")
# Numbered alternatives tried before giving up on finding a free name.
MAX_NAME_TRIES = 100


def _choose(directory: Path, name: tuple[str, str], content: bytes) -> tuple[Path, bool]:
    """A path in `directory` for `content`: the first of NAME.EXT, NAME-2.EXT, ... that is
    free, or that already holds exactly this content (an earlier run wrote it: reused)."""
    stem, ext = name
    for i in range(1, MAX_NAME_TRIES + 1):
        path = directory / (f"{stem}{ext}" if i == 1 else f"{stem}-{i}{ext}")
        try:
            if path.read_bytes() == content:
                return path, True
        except FileNotFoundError:
            return path, False
        except OSError:
            pass
    raise ConfigError(f"{directory}: no free name for {stem}{ext} after {MAX_NAME_TRIES} tries")


def _write_new(path: Path, content: bytes, owner) -> None:
    """Create `path` with `content`; never replaces a file (O_EXCL), fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    adopt(owner, path)


def _same_file_system(a: Path, b: Path) -> bool:
    def dev(p: Path) -> int:
        while not p.exists():
            p = p.parent
        return os.stat(p).st_dev
    return dev(a) == dev(b)


def run(args, settings: Settings, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    rules_given = args.tcp_rules is not None
    rules_path = Path(args.tcp_rules) if rules_given else None
    if rules_given and not (rules_path.exists() or rules_path.is_symlink()):
        print(f"mailappliance: --tcp-rules {rules_path}: no such file", file=err)
        return 1
    try:
        plan = source.read_source(Path(args.qmail), Path(args.vpopmail), rules_path, rules_given)
    except source.SourceError as e:
        print(f"mailappliance: {e}", file=err)
        return 1
    data = settings.data
    out_dir = settings.config_path.parent if settings.config_path else data
    if args.link and not _same_file_system(plan.vpopmail / "domains", data):
        print(f"mailappliance: --link needs {data} on the file system of "
              f"{plan.vpopmail / 'domains'} (hard links cannot cross file systems); "
              "leave --link out to move the mail", file=err)
        return 1
    notes: list[Note] = list(plan.notes)
    domains = [d.name for d in plan.domains]

    rules_bytes = plan.rules.text.encode("utf-8") if plan.rules is not None else None
    owner = None
    if not args.dry_run:
        data.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        owner = data_owner(data)
    file_owner = owner if out_dir == data else None
    rules_copy, rules_reused = (None, False)
    if rules_bytes is not None:
        rules_copy, rules_reused = _choose(out_dir, RULES_NAME, rules_bytes)
        if not args.dry_run and not rules_reused:
            _write_new(rules_copy, rules_bytes, file_owner)
    toml_text, more = toml_out.render(plan.control, data, rules_copy, domains)
    notes += more
    if plan.rules is not None:
        notes += list(plan.rules.refused) + list(plan.rules.notes)
    toml_bytes = toml_text.encode("utf-8")
    config_path, config_reused = _choose(out_dir, CONFIG_NAME, toml_bytes)
    if args.dry_run:
        try:
            tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as e:
            notes.append(Note("error", str(config_path), f"the file would not load: {e}"))
    else:
        if not config_reused:
            _write_new(config_path, toml_bytes, file_owner)
        try:
            load_settings(config_path)
        except ConfigError as e:
            notes.append(Note("error", str(config_path), f"does not load: {e}"))

    kill_after = os.environ.get(execute.KILL_AFTER_ENV)
    if args.dry_run:
        store = execute.ReadOnlyStore(data)
    else:
        store = execute.open_store(data, settings.bcrypt_cost, owner, settings)
    try:
        importer = execute.Importer(store, data, link=args.link, dry_run=args.dry_run,
                                    owner=owner, bcrypt_cost=settings.bcrypt_cost,
                                    kill_after=int(kill_after) if kill_after else None)
        outcome = importer.run(plan)
    finally:
        store.close()
    if not args.dry_run:
        os.sync()      # one flush for every link, rename and row, before the report says done
    notes += outcome.notes
    try:
        owned_by_root = os.stat(data).st_uid == 0
    except OSError:
        owned_by_root = True
    files = report.Files(config_path, config_reused, rules_copy, rules_reused, toml_text,
                         owned_by_root)
    out.write(report.render(plan, outcome, files, notes, data))
    out.flush()
    errors = sum(1 for n in notes if n.kind == "error")
    if errors:
        print(f"mailappliance: import {'check ' if args.dry_run else ''}found {errors} "
              f"error{'' if errors == 1 else 's'} (listed in the report)", file=err)
        return 1
    return 0
