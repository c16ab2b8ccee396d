"""smtp/replies.py: the reply each relay verdict gets (qmail's exact texts) and reply rendering."""

from __future__ import annotations

import pytest

from mailappliance.access.relay_policy import Verdict
from mailappliance.smtp import replies


@pytest.mark.parametrize("verdict, wire", [
    (Verdict.LOCAL, b"250 ok\r\n"),
    (Verdict.ALIAS, b"250 ok\r\n"),
    (Verdict.RELAY, b"250 ok\r\n"),
    (Verdict.NO_RELAY,
     b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"),
    (Verdict.NO_MAILBOX, b"550 sorry, no mailbox here by that name (#5.1.1)\r\n"),
    (Verdict.ROUTING_LOCAL_PART,
     b"550 sorry, no mailbox here by that name; no routing in local parts (#5.1.1)\r\n"),
])
def test_each_relay_verdict_gets_qmails_reply_to_rcpt(verdict, wire):
    reply = replies.rcpt_reply(verdict)
    assert reply.render() == wire
    # Accepted verdicts, and only those, get a 2xx.
    assert (reply.code // 100 == 2) is verdict.accept


def test_every_verdict_has_a_reply():
    assert set(replies.RCPT_VERDICT_REPLIES) == set(Verdict)


def test_enhanced_codes_follow_ehlo():
    reply = replies.rcpt_reply(Verdict.NO_RELAY)
    assert reply.render(enhanced=True) == (
        b"553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n")
    assert replies.rcpt_reply(Verdict.LOCAL).render(enhanced=True) == b"250 2.1.5 ok\r\n"
