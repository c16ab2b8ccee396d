"""SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954), as a pure state machine.

    ex = Exchange("LOGIN")
    step = ex.start(initial)          # the AUTH command's initial response, or None
    while isinstance(step, Challenge):
        send 334 + step.text; step = ex.respond(client_line)
    Credentials -> check the password; Malformed -> 501

No I/O, no logging: the adapter checks the credentials and never logs a payload. Base64 is
decoded strictly (RFC 4954 section 4: a malformed response ends the exchange with 501), text as
UTF-8 (RFC 4616 section 2). "=" stands for an empty initial response (RFC 4954 section 4).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field

MECHANISMS = ("PLAIN", "LOGIN")
# The LOGIN mechanism's two challenges, base64 of "Username:" and "Password:" as every
# implementation sends them (draft-murchison-sasl-login).
USERNAME_CHALLENGE = "VXNlcm5hbWU6"
PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"


@dataclass(frozen=True, slots=True)
class Challenge:
    text: str                        # base64 text after "334 " ("" for PLAIN's empty challenge)


@dataclass(frozen=True, slots=True)
class Credentials:
    login: str                       # authentication identity (RFC 4616 authcid)
    password: str = field(repr=False)
    authzid: str = ""                # authorization identity; "" = the same as login


@dataclass(frozen=True, slots=True)
class Malformed:
    why: str                         # for tests and debugging, never echoed with the payload


Step = Challenge | Credentials | Malformed


def _decode(text: str) -> str | None:
    if text == "=":
        return ""
    try:
        raw = binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None


class Exchange:
    """One AUTH exchange; `start` once, then `respond` to each line after a Challenge."""

    __slots__ = ("mechanism", "_login", "_done")

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        self.mechanism = mechanism
        self._login: str | None = None
        self._done = False

    def start(self, initial: str | None) -> Step:
        if self.mechanism == "PLAIN":
            if initial is None:
                return Challenge("")
            return self._plain(initial)
        if initial is None:
            return Challenge(USERNAME_CHALLENGE)
        return self._login_name(initial)

    def respond(self, line: str) -> Step:
        if self._done:
            return Malformed("exchange already over")
        if self.mechanism == "PLAIN":
            return self._plain(line)
        if self._login is None:
            return self._login_name(line)
        self._done = True
        password = _decode(line)
        if password is None:
            return Malformed("password is not base64 UTF-8")
        if not password:
            return Malformed("empty password")
        return Credentials(self._login, password)

    def _login_name(self, text: str) -> Step:
        name = _decode(text)
        if name is None:
            self._done = True
            return Malformed("user name is not base64 UTF-8")
        if not name:
            self._done = True
            return Malformed("empty user name")
        self._login = name
        return Challenge(PASSWORD_CHALLENGE)

    def _plain(self, text: str) -> Step:
        self._done = True
        message = _decode(text)
        if message is None:
            return Malformed("not base64 UTF-8")
        parts = message.split("\0")
        if len(parts) != 3:
            return Malformed("PLAIN needs authzid NUL authcid NUL passwd")
        authzid, login, password = parts
        if not login or not password:
            return Malformed("empty user name or password")
        return Credentials(login, password, authzid)
