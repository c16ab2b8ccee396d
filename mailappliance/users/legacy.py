"""crypt(3) password hashes carried over from vpopmail, verified until the first login.

vpopmail stores `crypt(3)` output in vpasswd: MD5-crypt (`$1$`, its default), SHA-256 and
SHA-512-crypt (`$5$`, `$6$`, optional `rounds=N$`) and, on old installations, traditional DES
(13 characters of `./0-9A-Za-z`). These are accepted at login so that no user has to reset a
password after `mailappliance import qmail`; the store replaces each with a bcrypt hash at the
first successful login (users/store.py `check_password`).

The formats are verified with libpass (the maintained fork of passlib, imported as `passlib`):
pure-Python implementations that behave the same on every libc, where the stdlib `crypt`
module is gone since Python 3.13 and its PyPI copy `crypt-r` is a C extension that needs a
compiler and libxcrypt's headers at install time. A hash in any other form (yescrypt `$y$`,
`{SSHA}`, a locked `*` or `!`) is not verified here: the importer creates that user disabled.

A pure core: no I/O.
"""

from __future__ import annotations

import re

# SHA-crypt's cost grows with the password length times the rounds; a password longer than
# this is refused without hashing, so a login attempt costs a bounded amount of CPU. vpopmail
# itself limits passwords to 128 characters (MAX_PW_CLEAR_PASSWD in vpopmail's config.h).
MAX_LEGACY_PASSWORD_BYTES = 128
# glibc's limit on SHA-crypt rounds is 999,999,999; a hash asking for more than this costs
# seconds per login and is surely not one vpopmail wrote (its default is 5,000).
MAX_SHA_CRYPT_ROUNDS = 1_000_000

_B64 = r"[./0-9A-Za-z]"
_FORMATS = (
    ("md5-crypt", re.compile(rf"^\$1\${_B64}{{0,8}}\${_B64}{{22}}$")),
    ("sha256-crypt", re.compile(rf"^\$5\$(?:rounds=(\d{{1,9}})\$)?{_B64}{{0,16}}\${_B64}{{43}}$")),
    ("sha512-crypt", re.compile(rf"^\$6\$(?:rounds=(\d{{1,9}})\$)?{_B64}{{0,16}}\${_B64}{{86}}$")),
    ("des-crypt", re.compile(rf"^{_B64}{{13}}$")),
)
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./0-9A-Za-z]{53}$")


def identify(hashed: str) -> str | None:
    """The name of a crypt(3) format we can verify ("md5-crypt", "sha256-crypt",
    "sha512-crypt", "des-crypt", "bcrypt"), or None."""
    if not isinstance(hashed, str):
        return None
    if _BCRYPT.match(hashed):
        return "bcrypt"
    for name, pattern in _FORMATS:
        m = pattern.match(hashed)
        if m:
            if m.groups() and m.group(1) is not None and \
                    not 1000 <= int(m.group(1)) <= MAX_SHA_CRYPT_ROUNDS:
                return None
            return name
    return None


def _handler(kind: str):
    from passlib import hash as h
    return {"md5-crypt": h.md5_crypt, "sha256-crypt": h.sha256_crypt,
            "sha512-crypt": h.sha512_crypt, "des-crypt": h.des_crypt}[kind]


def verify(password: str, hashed: str) -> bool:
    """True when `password` matches a crypt(3) hash of a format `identify` knows (not bcrypt:
    passwords.verify_password handles that one)."""
    kind = identify(hashed)
    if kind is None or kind == "bcrypt":
        return False
    pw = password.encode("utf-8")
    if not pw or len(pw) > MAX_LEGACY_PASSWORD_BYTES or b"\0" in pw:
        return False
    try:
        return bool(_handler(kind).verify(pw, hashed))
    except (ValueError, TypeError):
        return False
