"""Fakes that ship beside the interfaces they fake (CONVENTIONS.md example 7).

- mailappliance.testing.resolver.FakeResolver: an IResolver answering from zone data.
- mailappliance.testing.dnsserver: a real DNS server on loopback (in-process or subprocess).
- mailappliance.testing.threads: thread-pool doubles.
- mailappliance.testing.transport: a StringTransport that pauses its producer as TCP does.
- mailappliance.testing.delivery: fake local/remote deliverers and an in-memory message source
  (delivery/interfaces.py), for the queue manager's tests.
"""

from mailappliance.testing.resolver import FakeResolver

__all__ = ["FakeResolver"]
