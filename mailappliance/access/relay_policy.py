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
"""

from __future__ import annotations

from dataclasses import dataclass

from mailappliance.address import Destination
from mailappliance.smtp import replies
from mailappliance.smtp.replies import Reply

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


@dataclass(frozen=True, slots=True)
class Verdict:
    accept: bool
    reply: Reply
    why: str        # for the log: local, alias, relay, no-mailbox, routing-local-part, no-relay


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
            return Verdict(True, replies.RCPT_OK, "relay")
        return Verdict(False, replies.NOT_IN_RCPTHOSTS, "no-relay")
    # One of our domains from here on.
    if dest.route_chars:
        # a%b@ours, b!a@ours, "a@b"@ours: never a mailbox here and never a route to elsewhere.
        return Verdict(False, replies.BAD_LOCAL_PART, "routing-local-part")
    if local == USER:
        return Verdict(True, replies.RCPT_OK, "local")
    if local == ALIAS:
        return Verdict(True, replies.RCPT_OK, "alias")
    return Verdict(False, replies.NO_MAILBOX, "no-mailbox")
