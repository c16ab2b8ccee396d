"""Password hashing (bcrypt only) and the password policy of `user add` / `user passwd`.

Stored hashes are bcrypt, except for two kinds the importer writes (`mailappliance import
qmail`): vpopmail's crypt(3) hashes, verified by users/legacy.py until the first successful
login replaces them (`needs_rehash`), and a disabled account, `DISABLED_PREFIX` followed by
the hash that could not be verified, which no password matches.
"""

from __future__ import annotations

import bcrypt

from mailappliance.users import legacy

DEFAULT_COST = 12
# bcrypt reads at most 72 bytes; longer passwords would be silently truncated, so refuse them.
MAX_PASSWORD_BYTES = 72
# The seed's practice: at least 8 characters mixing letters, digits and symbols.
MIN_PASSWORD_LENGTH = 8


def check_policy(password: str) -> str | None:
    """Why `password` is not acceptable, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"password too short: at least {MIN_PASSWORD_LENGTH} characters"
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        return f"password too long: at most {MAX_PASSWORD_BYTES} bytes (bcrypt's limit)"
    if any(c in password for c in "\0\r\n"):
        return "password must not contain NUL, CR or LF"
    if not any(c.isalpha() for c in password):
        return "password needs at least one letter"
    if not any(c.isdigit() for c in password):
        return "password needs at least one digit"
    if all(c.isalnum() for c in password):
        return "password needs at least one symbol (neither letter nor digit)"
    return None


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=cost)).decode("ascii")


# A stored hash starting with this never verifies (as `usermod -L` marks /etc/shadow).
DISABLED_PREFIX = "!"


def is_disabled(hashed: str) -> bool:
    return not hashed or hashed.startswith(DISABLED_PREFIX)


def needs_rehash(hashed: str) -> bool:
    """A legacy crypt(3) hash that a successful login should replace with bcrypt."""
    return legacy.identify(hashed) not in (None, "bcrypt")


def verify_password(password: str, hashed: str) -> bool:
    if is_disabled(hashed):
        return False
    if not hashed.startswith("$2"):
        return legacy.verify(password, hashed)
    pw = password.encode("utf-8")
    if len(pw) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(pw, hashed.encode("ascii"))
    except ValueError:
        return False


# One bcrypt hash per cost, checked when the address is unknown (dummy_hash).
_dummies: dict[int, str] = {}


def dummy_hash(cost: int) -> str:
    """A hash to check a password against when there is no user: an unknown address costs
    one bcrypt too, so timing does not tell which addresses exist."""
    hashed = _dummies.get(cost)
    if hashed is None:
        hashed = _dummies[cost] = hash_password("dummy-password-1!", cost)
    return hashed


def login(user, password: str, cost: int, rehash):
    """What both user stores do with the user a login names (None: no such user): the user
    when `password` is right, else None; an imported crypt(3) hash just proved right is
    replaced through `rehash(user, password)`, which returns the user as stored then."""
    if user is None:
        verify_password(password, dummy_hash(cost))
        return None
    if not verify_password(password, user.password_hash):
        return None
    if needs_rehash(user.password_hash) and \
            len(password.encode("utf-8")) <= MAX_PASSWORD_BYTES:
        return rehash(user, password)
    return user
