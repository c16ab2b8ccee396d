"""Delivery's seams (delivery/interfaces.py): the real parts and the fakes in
mailappliance/testing/delivery.py provide the interfaces they claim, checked with verifyObject,
and the fakes behave as the queue manager's tests rely on."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from mailappliance.delivery.interfaces import (
    ILocalDeliverer, IMessageReader, IMessageSource, IRemoteDeliverer)
from mailappliance.delivery.local import LocalDeliverer
from mailappliance.delivery.remote import RemoteDeliverer
from mailappliance.envelope import Envelope, Recipient, failure
from mailappliance.queue.store import QueueStore
from mailappliance.testing import FakeResolver
from mailappliance.testing.delivery import (
    BytesReader, FakeLocalDeliverer, FakeRemoteDeliverer, MemoryMessageSource)
from mailappliance.testing.threads import ImmediateThreadPool, ThreadlessReactor


def envelope(qid=7, rcpts=("a@test.com", "b@far.example")) -> Envelope:
    env = Envelope(sender="s@test.com", birth=0.0, token="t",
                   recipients=[Recipient(i, a) for i, a in enumerate(rcpts)])
    env.qid = qid
    return env


@pytest.mark.parametrize("iface,make", [
    (ILocalDeliverer, FakeLocalDeliverer),
    (IRemoteDeliverer, FakeRemoteDeliverer),
    (IMessageSource, MemoryMessageSource),
    (IMessageReader, lambda: BytesReader(b"x")),
])
def test_the_fakes_provide_their_interfaces(iface, make):
    assert verifyObject(iface, make())


def test_the_real_parts_provide_the_same_interfaces(tmp_path):
    reactor, pool = ThreadlessReactor(), ImmediateThreadPool()
    store = QueueStore(tmp_path / "queue")
    assert verifyObject(IMessageSource, store)
    qid = store.inject(b"Subject: x\n\nbody\n", "s@test.com", ["a@test.com"], trigger=False)
    with store.open_message(store.read_envelope(qid)) as reader:
        assert verifyObject(IMessageReader, reader)
    assert verifyObject(ILocalDeliverer, LocalDeliverer(
        users=None, injector=None, reactor=reactor, threadpool=pool, hostname="mail.test.com"))
    assert verifyObject(IRemoteDeliverer, RemoteDeliverer(
        reactor, FakeResolver({}), pool, hostname="mail.test.com", is_me=lambda ip: False))


def test_memory_source_serves_kept_bytes_first_and_reads_in_chunks():
    env = envelope()
    source = MemoryMessageSource({7: b"Subject: x\n\n" + b"y" * 100})
    assert source.read_message(env) == b"Subject: x\n\n" + b"y" * 100
    env.data = b"kept"
    assert source.read_message(env) == b"kept"
    with source.open_message(env) as reader:
        assert reader.size == 112 and reader.read(10) == b"Subject: x"
        assert b"".join(reader) == b"\n\n" + b"y" * 100 and reader.read(1) == b""
    assert [r.closed for r in source.opened] == [True]


def test_fake_deliverers_record_calls_and_sources_and_answer_from_their_script():
    env, source = envelope(), MemoryMessageSource()
    local, remote = FakeLocalDeliverer(), FakeRemoteDeliverer()
    local.script["a@test.com"] = failure("no")
    out = []
    local.deliver(env, 0, source).addCallback(out.append)
    remote.deliver(env, [1], source).addCallback(out.append)
    assert out[0] == failure("no") and [r.status for r in out[1]] == ["success"]
    assert local.calls == [(7, "a@test.com")] and remote.calls == [(7, ["b@far.example"])]
    assert local.sources == [source] and remote.sources == [source]
    remote.hold = True
    remote.deliver(env, [1], source).addCallback(out.append)
    assert len(out) == 2 and len(remote.held) == 1
    remote.held[0].callback([failure("later")])
    assert out[2] == [failure("later")]
