"""The relay decision for one RCPT: qmail's rcpthosts + RELAYCLIENT, vpopmail's user check.

A pure function of facts gathered by the adapter, so every combination is a row in a test table:

- `dest`: the classified forward path (address.classify): the final domain, and whether the local
  part holds routing characters or quoting;
- `local`: what the user store says about the address: "user", "alias", "unknown" (our domain,
  no such name) or "remote" (not one of our domains). For an IP literal the adapter passes
  "remote" without asking the store: a literal is never one of our domains.
- `client`: how the connecting client may relay: RELAYCLIENT from the rules file, an
  authenticated session, a POP-before-SMTP grant.

The sender address plays no part: a sender never grants relay.

The answer is a `Verdict`, a plain value naming the case; it says nothing about the wire. The
SMTP adapter turns it into qmail's reply through `smtp/replies.py` (`rcpt_reply`), so this module
imports nothing from `smtp` and the arrow runs one way: smtp -> access.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mailappliance.address import Destination

USER, ALIAS, UNKNOWN, REMOTE = "user", "alias", "unknown", "remote"
LOOKUP_ANSWERS = frozenset({USER, ALIAS, UNKNOWN, REMOTE})


@dataclass(frozen=True, slots=True)
class RelayClient:
    """What entitles this session to relay (each flag on its own suffices)."""

    relayclient: bool = False        # RELAYCLIENT in the session env (rules file, tcpserver)
    authenticated: bool = False      # SMTP AUTH succeeded in this session
    granted: bool = False            # POP-before-SMTP grant for the client IP (vchkpw roaming)

    @property
    def may_relay(self) -> bool:
        return self.relayclient or self.authenticated or self.granted


class Verdict(enum.Enum):
    """The relay decision for one recipient. The value is the word the log line uses."""

    LOCAL = "local"                          # accepted: a user of one of our domains
    ALIAS = "alias"                          # accepted: an alias in one of our domains
    RELAY = "relay"                          # accepted: elsewhere, and the client may relay
    NO_RELAY = "no-relay"                    # refused: elsewhere, not in rcpthosts (qmail 553)
    NO_MAILBOX = "no-mailbox"                # refused: our domain, no such name (550)
    ROUTING_LOCAL_PART = "routing-local-part"  # refused: a%b, b!a, "a@b" in our domain (550)

    @property
    def accept(self) -> bool:
        return self in _ACCEPTED

    @property
    def why(self) -> str:
        """For the log: local, alias, relay, no-mailbox, routing-local-part, no-relay."""
        return self.value


_ACCEPTED = frozenset({Verdict.LOCAL, Verdict.ALIAS, Verdict.RELAY})


def needs_user_lookup(dest: Destination) -> bool:
    """Whether the adapter should ask the store for the full address (else: domain only)."""
    return not dest.literal and not dest.route_chars


def decide(dest: Destination, local: str, client: RelayClient) -> Verdict:
    if local not in LOOKUP_ANSWERS:
        raise ValueError(f"unknown lookup answer {local!r}")
    if dest.literal:
        local = REMOTE                   # never trust a store answer for a literal
    if local == REMOTE:
        if client.may_relay:
            return Verdict.RELAY
        return Verdict.NO_RELAY
    # One of our domains from here on.
    if dest.route_chars:
        # a%b@ours, b!a@ours, "a@b"@ours: never a mailbox here and never a route to elsewhere.
        return Verdict.ROUTING_LOCAL_PART
    if local == USER:
        return Verdict.LOCAL
    if local == ALIAS:
        return Verdict.ALIAS
    return Verdict.NO_MAILBOX
