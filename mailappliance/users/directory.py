"""The user directory and the roaming grants as interfaces, whichever engine is behind them.

Two backends implement them: the embedded SQLite store (`users/store.py`, `access/relay.py`;
one node, the default) and PostgreSQL (`users/pgstore.py`; several nodes sharing one
database, DESIGN.md section 6). Callers (SMTP, POP3, local delivery, the admin protocol, the
CLI) hold an `IUserDirectory` and an `IRelayGrants` and need not know which; `backend.py`
opens the one the configuration names.

Both are blocking stores (CONVENTIONS.md): no Twisted here. Lookups are answered from a cache
where the backend has one, so a call from the reactor thread is cheap on a hit; a backend
whose miss waits on the network also provides `IRemoteDirectory`, whose `peek_*` methods
answer from the cache only, so the reactor can send a miss to a thread instead of waiting.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface, classImplements

from mailappliance.access.relay import RelayGrants
from mailappliance.users.store import UserStore


class DirectoryUnavailable(OSError):
    """The directory cannot be reached (database down, network cut, pool exhausted).

    An OSError on purpose: every caller already treats OSError from the store as a temporary
    failure (SMTP answers 451 at RCPT, local delivery retries later, POP3 answers
    -ERR [SYS/TEMP]), which is what DESIGN.md section 6 asks of a node that lost its database.
    str() is one line for the log, without the database password.
    """


# The answer `peek_*` gives when the cache cannot answer without I/O.
MISS = type("Miss", (), {"__repr__": lambda self: "MISS", "__bool__": lambda self: False})()


class IUserDirectory(Interface):
    """Domains, users, aliases, quotas and bcrypt hashes (vpopmail's job).

    Writers raise `users.store.StoreError` (one line for the operator) for a refused request;
    any method may raise OSError (`DirectoryUnavailable` for a database that cannot be
    reached), which callers treat as temporary. A change made through any instance, on any
    node, counts for this instance's lookups from its next lookup (SQLite) or within the
    backend's stated staleness bound (PostgreSQL: `pgstore.MAX_STALE_SECONDS`).
    """

    bcrypt_cost = Attribute("bcrypt cost for new hashes; `reload` may change it")

    def add_domain(name, postmaster=None):
        """Create a domain (IDNA, lower case); returns its stored name."""

    def del_domain(name):
        """Delete a domain, its users, aliases and Maildirs."""

    def list_domains():
        """All domain names, sorted bytewise."""

    def has_domain(name):
        """True when `name` is one of our domains (cached)."""

    def add_user(address, password, quota=0):
        """Create a user and its Maildir; returns the User. The first user of a domain with
        no named postmaster receives the role aliases (RFC 2142)."""

    def del_user(address):
        """Delete a user and its mail."""

    def set_password(address, password):
        """Store a new bcrypt hash."""

    def set_quota(address, quota):
        """Bytes, 0 for none."""

    def get_user(address):
        """The User or None (cached)."""

    def list_users(domain=None):
        """Users, sorted by domain and local part; StoreError for an unknown domain."""

    def add_alias(address, targets):
        """Create or replace a forward list."""

    def del_alias(address):
        """Remove an alias."""

    def get_alias(address):
        """A fresh list of targets, or None (cached)."""

    def list_aliases():
        """[(address, targets)] sorted by domain and local part."""

    def lookup_recipient(address):
        """"user", "alias", "unknown" (our domain, no such name) or "remote" (cached)."""

    def check_password(address, password):
        """Blocking bcrypt check against the current hash; the User or None. Unknown users
        cost one bcrypt too."""

    def maildir_for(local, domain):
        """The Path of a user's Maildir in the mailbox tree."""

    def close():
        """Release connections and threads; the instance is not used afterwards."""


class IRemoteDirectory(IUserDirectory):
    """A directory whose cache misses wait on the network (PostgreSQL).

    Code on the reactor thread asks `peek_*` first and sends a `MISS` to a thread with the
    blocking method; the blocking method remembers its answer for the next peek.
    """

    description = Attribute("the database, for `stat` and logs, without its password")

    def peek_recipient(address):
        """lookup_recipient's answer from the cache, or MISS."""

    def peek_domain(name):
        """has_domain's answer from the cache, or MISS."""

    def sync(timeout=5.0):
        """Block until every change committed before this call counts for lookups here."""


class IRelayGrants(Interface):
    """POP-before-SMTP grants keyed by client IP (vchkpw --enable-roaming-users)."""

    def grant(ip, seconds):
        """Let `ip` relay for `seconds` (0 or less grants nothing)."""

    def is_granted(ip):
        """True while a grant for `ip` is valid."""

    def expire():
        """Drop expired grants; returns their IPs (for the log)."""

    def entries():
        """[(ip, seconds left)] of valid grants, soonest expiry first."""


class IRemoteGrants(IRelayGrants):
    """Grants shared by several nodes through a database: `peek` answers without I/O."""

    def peek(ip):
        """is_granted's answer from the cache, or MISS."""


classImplements(UserStore, IUserDirectory)
classImplements(RelayGrants, IRelayGrants)
