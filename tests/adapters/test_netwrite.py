"""netwrite.close_now over real loopback TCP in the test's reactor: the peer gets every byte
written before and after it, then an orderly end (FIN, not a reset), and the server's protocol
hears connectionLost once, with ConnectionDone, never from inside its own dataReceived."""

from __future__ import annotations

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailappliance.netwrite import close_now, write_now


class Server(protocol.Protocol):
    """Answers a line: "bye" -> reply then close_now; "bye2" -> close_now then one more write;
    "big" -> more than the socket takes, then close_now (the fallback path)."""

    def connectionMade(self):
        self.factory.protocols.append(self)
        self.lost = []
        self.in_data = False

    def dataReceived(self, data):
        self.in_data = True
        try:
            cmd = data.strip()
            if cmd == b"bye":
                write_now(self.transport, b"221 bye\r\n")
                close_now(self.transport)
            elif cmd == b"bye2":
                write_now(self.transport, b"221 first\r\n")
                close_now(self.transport)
                self.transport.write(b"after\r\n")
            elif cmd == b"big":
                self.transport.write(b"x" * (8 << 20))
                close_now(self.transport)
        finally:
            self.in_data = False

    def connectionLost(self, reason):
        self.lost.append((reason.type, self.in_data))


class Client(protocol.Protocol):
    def __init__(self, line: bytes, read: bool = True):
        self.line, self.read = line, read
        self.got = bytearray()
        self.done = defer.Deferred()

    def connectionMade(self):
        if not self.read:
            self.transport.pauseProducing()
        self.transport.write(self.line + b"\r\n")

    def dataReceived(self, data):
        self.got += data

    def connectionLost(self, reason):
        self.done.callback(reason.type)


class CloseNowTests(unittest.TestCase):
    def setUp(self):
        self.factory = protocol.Factory.forProtocol(Server)
        self.factory.protocols = []
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def talk(self, line: bytes, read: bool = True) -> Client:
        client = Client(line, read)
        await protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.port.getHost().port)
        if not read:
            await deferLater(reactor, 0.3, lambda: None)
            client.transport.resumeProducing()
        client.reason = await client.done
        await deferLater(reactor, 0, lambda: None)
        return client

    async def test_reply_then_orderly_close(self):
        client = await self.talk(b"bye")
        self.assertEqual(bytes(client.got), b"221 bye\r\n")
        self.assertIs(client.reason, error.ConnectionDone)      # FIN, not a reset
        [server] = self.factory.protocols
        self.assertEqual(server.lost, [(error.ConnectionDone, False)])

    async def test_bytes_written_after_close_now_are_sent_first(self):
        client = await self.talk(b"bye2")
        self.assertEqual(bytes(client.got), b"221 first\r\nafter\r\n")
        self.assertIs(client.reason, error.ConnectionDone)
        [server] = self.factory.protocols
        self.assertEqual(server.lost, [(error.ConnectionDone, False)])

    async def test_pending_buffer_takes_twisteds_path(self):
        client = await self.talk(b"big", read=False)
        self.assertEqual(len(client.got), 8 << 20)
        self.assertIs(client.reason, error.ConnectionDone)
        [server] = self.factory.protocols
        self.assertEqual(server.lost, [(error.ConnectionDone, False)])

    async def test_peer_reset_before_the_close_runs(self):
        # The timer finds the connection already gone: nothing raised, connectionLost once.
        lost = defer.Deferred()

        class Quiet(Server):
            def dataReceived(self, data):
                close_now(self.transport)
                self.transport.connectionLost(Failure(error.ConnectionLost()))
                reactor.callLater(0.05, lost.callback, None)

        self.factory.protocol = Quiet
        client = Client(b"x")
        await protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.port.getHost().port)
        await lost
        [server] = self.factory.protocols
        self.assertEqual([t for t, _ in server.lost], [error.ConnectionLost])
        await client.done
