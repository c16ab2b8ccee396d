"""Password checks for POP3 and SMTP AUTH, off the reactor thread (vchkpw's job).

bcrypt costs tens of milliseconds by design; it runs in the application's thread pool so one
login never stalls other clients. Unknown users cost the same bcrypt as known ones.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from mailappliance.users.store import StoreError, User, UserStore, normalize_domain

# A login name longer than an address can be is refused without hashing anything.
MAX_LOGIN = 320


def login_address(login: str, default_domain: str | None) -> str | None:
    """vpopmail login forms: `user` (default domain), `user@domain`, `user%domain`."""
    if not login or len(login) > MAX_LOGIN or any(ord(c) < 33 for c in login):
        return None
    if "@" in login:
        local, _, domain = login.rpartition("@")
    elif "%" in login:
        local, _, domain = login.rpartition("%")
    elif default_domain:
        local, domain = login, default_domain
    else:
        return None
    try:
        domain = normalize_domain(domain)
    except StoreError:
        return None
    return f"{local}@{domain}" if local else None


class Authenticator:
    def __init__(self, store: UserStore, reactor, threadpool) -> None:
        self.store = store
        self.reactor = reactor
        self.threadpool = threadpool

    def authenticate(self, login: str, password: str,
                     default_domain: str | None = None) -> Deferred:
        """Deferred firing with the User, or None for any failure (same path, same cost)."""
        address = login_address(login, default_domain)
        return deferToThreadPool(self.reactor, self.threadpool, self._check, address, password)

    def _check(self, address: str | None, password: str) -> User | None:
        # An unparsable login still pays for one bcrypt, so it answers after the same delay.
        return self.store.check_password(address or "invalid@invalid.invalid", password)
