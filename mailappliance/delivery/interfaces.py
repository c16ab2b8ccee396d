"""The seams of delivery: what a deliverer offers the queue manager, and what it needs from it.

Delivery sits below the queue (CONVENTIONS.md example 11, chasquid's couriers): the queue
manager holds the deliverers and hands each delivery the envelope, the recipients' indices and
a message source to read the message from; a deliverer never imports the queue.  Where local
delivery must send a message on (an alias's forward) it uses the injector it was given.

Fakes of each interface ship in mailappliance/testing/delivery.py (checked with
zope.interface.verify.verifyObject).  Only zope.interface is imported here.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IMessageReader(Interface):
    """The message part of one queued message, read in chunks; a context manager and an
    iterable of chunks (``with source.open_message(env) as r: for chunk in r: ...``).
    Blocking: call it in a pool thread."""

    size = Attribute("The message's length in bytes (the stored form: lines end in LF).")

    def read(n):
        """Up to `n` more bytes; b"" at the end."""

    def close():
        """Release the file."""

    def __iter__():
        """The remaining bytes, in chunks."""

    def __enter__():
        """-> the reader itself."""

    def __exit__(exc_type, exc_value, traceback):
        """close()."""


class IMessageSource(Interface):
    """Where a deliverer reads a queued message (the queue store provides it). Blocking:
    call it in a pool thread."""

    def read_message(env):
        """The whole message of `env` (an envelope.Envelope) as bytes: the bytes kept in
        memory since its injection (``env.data``) while the queue still holds them, otherwise
        read from the queue."""

    def open_message(env):
        """-> an IMessageReader over the message of `env`, for messages too large to read
        at once."""


class ILocalDeliverer(Interface):
    """qmail-local: one recipient of a local domain."""

    def deliver(env, index, messages):
        """Deliver recipient `index` of `env`, reading the message from `messages` (an
        IMessageSource). -> Deferred[envelope.Result]; a failed Deferred counts as a
        deferral."""

    def flush():
        """Start now the deliveries the deliverer holds back to batch them (a gathering
        window): the queue calls it when no further delivery can come (every local slot
        taken, or the queue stops)."""


class IRemoteDeliverer(Interface):
    """qmail-remote: the recipients of one message at one domain, in one SMTP transaction."""

    def deliver(env, indices, messages):
        """Deliver recipients `indices` of `env` (all at one domain), reading the message
        from `messages` (an IMessageSource). -> Deferred[list[envelope.Result]] aligned
        with `indices`; a failed Deferred counts as a deferral of each."""
