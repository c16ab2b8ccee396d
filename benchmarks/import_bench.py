"""Time and memory of `mailappliance import qmail` on a large synthetic vpopmail host (issue 22).

    /work/venv/bin/python benchmarks/import_bench.py [--users 10000] [--messages 1000000]
        [--domains 10] [--move] [--owner UID] [--dir /var/tmp] [--keep]

Builds a qmail + vpopmail tree (tests/qmail_tree.py: the documented formats) with `--users`
users spread over `--domains` domains and `--messages` Maildir files spread evenly over them
(half in new/, half in cur/ with ":2,S"), on the real disk (`--dir`, ext4, not tmpfs), then runs
the real command twice as a subprocess: `--dry-run` (reads everything, counts every file) and
the import itself with `--link` (or a move with `--move`). For each it reports wall time, CPU
seconds (user + system) and the peak RSS of the command (wait4's ru_maxrss), and the machine's
other load during the run (shared 2 cores: read figures with "others" above ~25 % as noisy).
Afterwards it checks that every message is in the new tree (hard links: same inode).

Every user has an MD5-crypt hash (kept as it is: no hashing at import). A vpasswd with
clear-text fields would cost one bcrypt per user (about 0.25 s at cost 12, spread over the
cores) on top of these figures. The page cache is warm (the tree was just written); dropping
it would disturb everyone else's measurements on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    fmt, machine_info, system_busy_seconds, table, write_results)
from tests.qmail_tree import TDomain, TUser, message, write_tree  # noqa: E402

CONTROL = {"me": "mail.example.com\n", "rcpthosts": "", "databytes": "20000000\n",
           "concurrencyremote": "40\n"}
# A typical small message: the benchmark is about directory entries, not bytes.
BODY = message("benchmark") + b"x" * 1500 + b"\n"


def build(root: Path, users: int, messages: int, domains: int) -> tuple[object, float]:
    t0 = time.monotonic()
    names = [f"bench{i}.example.com" for i in range(domains)]
    per_domain = [[] for _ in names]
    for i in range(users):
        # vpopmail hashes big domains into 0/, 1/, ... subdirectories; do it too.
        per_domain[i % domains].append(TUser(f"user{i}", subdir=str((i // domains) % 10)))
    tree = write_tree(root, [TDomain(n, u) for n, u in zip(names, per_domain)],
                      control={**CONTROL, "rcpthosts": "\n".join(names) + "\n"},
                      tcp_rules='127.0.0.1:allow,RELAYCLIENT=""\n:allow\n', hashes={})
    base, extra = divmod(messages, users)
    stamp = 1_700_000_000
    k = 0
    for di, d in enumerate(tree.domains):
        for u in d.users:
            md = os.fspath(tree.user_dir(d.name, u) / "Maildir")
            count = base + (1 if k < extra else 0)
            for j in range(count):
                name = f"{stamp + k * 1000 + j}.{k}_{j}.mail.example.com"
                path = f"{md}/new/{name}" if j % 2 == 0 else f"{md}/cur/{name}:2,S"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, BODY)
                os.close(fd)
            k += 1
    return tree, time.monotonic() - t0


def run(cmd: list[str]) -> dict:
    busy0 = system_busy_seconds()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_chunks = []
    # Read the report while the command runs (it can be megabytes with 10,000 users).
    for chunk in iter(lambda: proc.stdout.read(65536), b""):
        out_chunks.append(chunk)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    busy = system_busy_seconds() - busy0
    cpu = usage.ru_utime + usage.ru_stime
    return {"rc": proc.returncode, "wall_s": wall, "cpu_s": cpu, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime, "max_rss_mib": usage.ru_maxrss / 1024,
            "others_cpu_pct": max(0.0, 100.0 * (busy - cpu) / wall) if wall else 0.0,
            "report_bytes": sum(map(len, out_chunks)), "stderr": err.decode(errors="replace"),
            "report_tail": b"".join(out_chunks)[-3000:].decode(errors="replace")}


def verify(tree, data: Path, link: bool) -> tuple[int, int]:
    """(messages found in the new tree, of which the same inode as the old file)."""
    found = same = 0
    for d in tree.domains:
        for u in d.users:
            new = data / "domains" / d.name / u.name / "Maildir"
            old = tree.user_dir(d.name, u) / "Maildir"
            for sub in ("new", "cur"):
                with os.scandir(new / sub) as it:
                    for e in it:
                        found += 1
                        if link and e.inode() == os.stat(old / sub / e.name).st_ino:
                            same += 1
    return found, same


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--domains", type=int, default=10)
    p.add_argument("--move", action="store_true", help="move instead of --link")
    p.add_argument("--dir", default="/var/tmp", help="scratch directory on the real disk")
    p.add_argument("--keep", action="store_true", help="keep the scratch tree")
    p.add_argument("--owner", type=int, default=None, metavar="UID",
                   help="run as root, give the data directory to this uid first (each placed "
                   "file then costs a chown too, as in a real import)")
    args = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="import-bench-", dir=args.dir))
    try:
        print(f"building {args.users:,} users, {args.messages:,} messages in {scratch} ...",
              flush=True)
        tree, build_s = build(scratch / "old-host", args.users, args.messages, args.domains)
        print(f"built in {build_s:.1f} s", flush=True)
        if args.owner is not None:
            (scratch / "var").mkdir()
            os.chown(scratch / "var", args.owner, args.owner)
        conf = scratch / "mailappliance.toml"
        conf.write_text(f'data = "{scratch / "var"}"\n')
        base = [sys.executable, "-m", "mailappliance.cli", "--config", str(conf),
                "import", "qmail", *tree.args()]
        mode = [] if args.move else ["--link"]
        results = {}
        for name, extra in (("dry run", ["--dry-run"]), ("import", mode)):
            print(f"running {name} ...", flush=True)
            results[name] = run(base + extra)
            print(f"  {results[name]['wall_s']:.1f} s, rc {results[name]['rc']}", flush=True)
        found, same = verify(tree, scratch / "var", not args.move)
        rows = [[name, fmt(r["wall_s"], 1), fmt(r["cpu_s"], 1), fmt(r["user_s"], 1),
                 fmt(r["sys_s"], 1), fmt(r["max_rss_mib"], 1),
                 fmt(args.messages / r["wall_s"] if r["wall_s"] else None),
                 fmt(r["others_cpu_pct"]), r["rc"]] for name, r in results.items()]
        text = "\n".join([
            f"import qmail: {args.users:,} users, {args.messages:,} messages, "
            f"{args.domains} domains, {'move' if args.move else '--link'}"
            + (f", data owned by uid {args.owner}" if args.owner is not None else "")
            + "; tree built in "
            f"{build_s:.1f} s",
            table(["run", "wall s", "cpu s", "user s", "sys s", "peak RSS MiB", "msgs/s",
                   "others CPU%", "rc"], rows),
            f"verified: {found:,} of {args.messages:,} messages in the new tree"
            + (f", {same:,} the same inode as the old file" if not args.move else ""),
            f"machine: {machine_info()}",
        ])
        print(text)
        path = write_results("import", text, {"args": vars(args), "build_s": build_s,
                                              "results": results, "found": found,
                                              "same_inode": same})
        print(f"results: {path}")
        if results["import"]["rc"] not in (0,) or found != args.messages:
            print(results["import"]["stderr"], results["import"]["report_tail"], sep="\n")
            return 1
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
