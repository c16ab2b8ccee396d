"""A remote directory and remote grants without a database, for adapter tests.

`FakeRemoteDirectory` wraps a real IUserDirectory (the SQLite store in a temp dir) and behaves
as the PostgreSQL backend does towards its callers: `peek_*` answers only what a blocking
lookup has cached, a change forgets the cache, and `down = True` makes every call raise
`DirectoryUnavailable` (an OSError), as a node that lost its database sees. `calls` counts
the blocking lookups (those that would have been round trips). `FakeRemoteGrants` does the
same for grants over a RelayGrants.
"""

from __future__ import annotations

from zope.interface import implementer

from mailappliance.access.relay import normalize_ip
from mailappliance.users.directory import (
    MISS,
    DirectoryUnavailable,
    IRemoteDirectory,
    IRemoteGrants,
)


class _Downable:
    down = False

    def _check(self) -> None:
        if self.down:
            raise DirectoryUnavailable("database postgresql://fake/: connection refused")


@implementer(IRemoteDirectory)
class FakeRemoteDirectory(_Downable):
    description = "postgresql://fake/"

    def __init__(self, inner) -> None:
        self.inner = inner
        self.cache: dict = {}
        self.calls = 0

    @property
    def bcrypt_cost(self):
        return self.inner.bcrypt_cost

    @bcrypt_cost.setter
    def bcrypt_cost(self, value):
        self.inner.bcrypt_cost = value

    def _write(self, name, *args):
        self._check()
        self.cache.clear()
        return getattr(self.inner, name)(*args)

    def _read(self, name, *args):
        self._check()
        return getattr(self.inner, name)(*args)

    def add_domain(self, name, postmaster=None):
        return self._write("add_domain", name, postmaster)

    def del_domain(self, name):
        return self._write("del_domain", name)

    def add_user(self, address, password, quota=0):
        return self._write("add_user", address, password, quota)

    def del_user(self, address):
        return self._write("del_user", address)

    def set_password(self, address, password):
        return self._write("set_password", address, password)

    def set_quota(self, address, quota):
        return self._write("set_quota", address, quota)

    def add_alias(self, address, targets):
        return self._write("add_alias", address, targets)

    def del_alias(self, address):
        return self._write("del_alias", address)

    def list_domains(self):
        return self._read("list_domains")

    def get_user(self, address):
        return self._read("get_user", address)

    def list_users(self, domain=None):
        return self._read("list_users", domain)

    def get_alias(self, address):
        return self._read("get_alias", address)

    def list_aliases(self):
        return self._read("list_aliases")

    def check_password(self, address, password):
        return self._read("check_password", address, password)

    def maildir_for(self, local, domain):
        return self.inner.maildir_for(local, domain)

    def close(self):
        self.inner.close()

    # -- the cached lookups --------------------------------------------------------------------
    def lookup_recipient(self, address):
        self._check()
        self.calls += 1
        answer = self.inner.lookup_recipient(address)
        self.cache[("r", address)] = answer
        return answer

    def has_domain(self, name):
        self._check()
        self.calls += 1
        answer = self.inner.has_domain(name)
        self.cache[("d", name)] = answer
        return answer

    def peek_recipient(self, address):
        return MISS if self.down else self.cache.get(("r", address), MISS)

    def peek_domain(self, name):
        return MISS if self.down else self.cache.get(("d", name), MISS)

    def sync(self, timeout=5.0):
        self._check()
        return 0.0


@implementer(IRemoteGrants)
class FakeRemoteGrants(_Downable):
    def __init__(self, inner) -> None:
        self.inner = inner
        self.cache: dict = {}
        self.calls = 0

    def grant(self, ip, seconds):
        self._check()
        self.cache.pop(normalize_ip(ip), None)
        return self.inner.grant(ip, seconds)

    def is_granted(self, ip):
        self._check()
        self.calls += 1
        answer = self.cache[normalize_ip(ip)] = self.inner.is_granted(ip)
        return answer

    def peek(self, ip):
        return MISS if self.down else self.cache.get(normalize_ip(ip), MISS)

    def expire(self):
        self._check()
        gone = self.inner.expire()
        for ip in gone:
            self.cache.pop(ip, None)
        return gone

    def entries(self):
        self._check()
        return self.inner.entries()
