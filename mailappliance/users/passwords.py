"""Password hashing (bcrypt only) and the password policy of `user add` / `user passwd`."""

from __future__ import annotations

import bcrypt

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


def verify_password(password: str, hashed: str) -> bool:
    pw = password.encode("utf-8")
    if len(pw) > MAX_PASSWORD_BYTES or not hashed:
        return False
    try:
        return bcrypt.checkpw(pw, hashed.encode("ascii"))
    except ValueError:
        return False
