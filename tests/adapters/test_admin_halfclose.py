"""The admin protocol when the client half-closes after its commands: every command is
answered (a slow one too), then the server closes."""

from __future__ import annotations

from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport

from mailappliance.admin import protocol as ap
from mailappliance.admin import service as adm
from mailappliance.config import load_settings
from mailappliance.testing.app import build_test_app
from mailappliance.testing.threads import DeferredThreadPool


def setup(tmp_path, pool=None):
    settings = load_settings(None, {"data": str(tmp_path / "var"), "bcrypt_cost": 4,
                                    "hostname": "mx.test.com"}, cwd=tmp_path)
    app = build_test_app(settings=settings, threadpool=pool)
    factory = adm.build_factory(app, "admin")
    addr = UNIXAddress(b"/tmp/admin.sock")
    proto = factory.buildProtocol(addr)
    tr = StringTransport(peerAddress=addr)
    proto.makeConnection(tr)
    return app, proto, tr


def replies(tr):
    r = ap.ReplyReader()
    r.receive_data(tr.value())
    return r.replies


def test_commands_then_eof_are_all_answered_then_closed(tmp_path):
    pool = DeferredThreadPool()
    app, proto, tr = setup(tmp_path, pool)
    proto.dataReceived(b"domain add test.com\ndomain list\nhelp")    # last line unterminated
    proto.readConnectionLost()
    assert not tr.disconnecting            # the store call is still in the pool
    pool.run_all()
    got = replies(tr)
    assert [ok for ok, _ in got] == [True, True, True]
    assert got[0][1] == ["domain test.com added"] and got[1][1] == ["test.com"]
    assert tr.disconnecting


def test_eof_without_a_command_just_closes(tmp_path):
    app, proto, tr = setup(tmp_path)
    proto.readConnectionLost()
    assert tr.value() == b"" and tr.disconnecting


def test_a_client_that_stops_reading_is_dropped(tmp_path):
    app, proto, tr = setup(tmp_path)
    proto.writeConnectionLost()
    assert tr.disconnecting
