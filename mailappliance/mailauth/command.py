"""`mailappliance dkim keygen DOMAIN [--selector S] [--algorithm rsa|ed25519]` and
`mailappliance dkim list`: work on data/dkim/ directly, with or without a running server (which
sees a new key at the next message it signs)."""

from __future__ import annotations

import argparse
from typing import TextIO

from mailappliance.mailauth import keys

DEFAULT_SELECTOR = "mail"


def add_parser(sub) -> None:
    dk = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(dest="action",
                                                                         required=True)
    gen = dk.add_parser("keygen", help="make a signing key and print its DNS record")
    gen.add_argument("domain")
    gen.add_argument("--selector", help="selector (default: [dkim] selector, else "
                     f"{DEFAULT_SELECTOR!r})")
    gen.add_argument("--algorithm", choices=keys.ALGORITHMS, default="rsa",
                     help="rsa (2048 bits, the default) or ed25519")
    dk.add_parser("list", help="domains, selectors and the DNS record each needs")


def default_selector(settings) -> str:
    return settings.dkim.selector or DEFAULT_SELECTOR


def run(args: argparse.Namespace, settings, out: TextIO, err: TextIO) -> int:
    """Exit status; raises keys.DKIMKeyError (one line) for a refused request."""
    data = settings.data
    try:
        present = data.is_dir()
    except OSError as e:
        raise keys.DKIMKeyError(f"cannot reach the data directory {data}: {e.strerror}") from None
    if not present:
        raise keys.DKIMKeyError(f"no instance at {data}: the data directory does not exist")
    if args.action == "keygen":
        selector = args.selector or default_selector(settings)
        key = keys.generate(data, args.domain, selector, args.algorithm)
        size = f" {key.private_key.key_size} bits" if key.algorithm == "rsa" else ""
        print(f"key {key.name} ({key.algorithm}{size}) written to {key.path}", file=out)
        print("publish this DNS record, then mail of the domain is signed with it:", file=out)
        print(keys.zone_line(key.name, key.txt_record()), file=out)
        return 0
    found, problems = keys.scan(data)
    for key in found:
        print(f"{key.domain} {key.selector} {key.algorithm}", file=out)
        print(f"  {keys.zone_line(key.name, key.txt_record())}", file=out)
    for line in problems:
        print(f"mailappliance: unusable key file: {line}", file=err)
    return 0
