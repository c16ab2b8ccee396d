"""End-of-DATA checks: the one hook point between a message's final dot and its queue commit.

Checks of a whole message -- mail authentication (DKIM, DMARC: mailauth/service.py), DKIM
signing, content scanning -- run here, in one ordered list, `app.end_of_data`, which
make_service builds (service.py `build_end_of_data`). The SMTP session (smtp/protocol.py)
drives them:

1. At DATA, it asks each check whether it `wants(tx)` this transaction (`tx` is a
   `Transaction`: envelope, client, how the client is trusted, the SPF result of MAIL FROM).
   When one does, the message is held in memory (`HeldMessage`, bounded by `[smtp] databytes`
   because the SMTP core stops passing bytes beyond it) instead of streaming to the queue file.
   When none does, nothing changes: the message streams to the queue as before.
2. After the final dot, `run_checks` calls `check(tx, message)` of each wanting check in list
   order. Each returns (or fires its Deferred with) an `Outcome`:
     - `accept(headers=..., message=...)`: go on, with `headers` (complete header fields, LF
       line ends) put on top, and `message` replacing the message when given (a check that
       removes a forged field); the next check sees the result;
     - `refuse(reply)`: a 5xx; the client gets it and nothing is queued (550 5.7.1 DMARC,
       554 5.7.0 a virus);
     - `tempfail(reply)`: a 4xx; the same, the client tries again later.
   The first refusal or tempfail ends the run. A check that raises or whose Deferred fails is
   logged and ends the run with 451 4.3.0, so no message is accepted unchecked by mistake (a
   check that prefers to accept when its back end is down says so itself, with accept()).
3. Accepted: the final bytes are committed to the queue (`Injector.inject`), and only then
   the client gets its 250.

Order of the list (service.py): verification first (cheap, may refuse), content scanning next
(it sees our Authentication-Results), signing last (it signs what is queued, and a check
after it could break its signature).

While checks run, the session waits like for any pending decision: replies to pipelined
commands leave in order, and nothing blocks the reactor for long, so other sessions never
wait (each check does its slow work -- DNS, a scanner's socket -- asynchronously, and CPU work
of more than about a millisecond in the thread pool; mail authentication verifies and signs a
small message on the reactor thread, docs/MAILAUTH.md says why). A client whose connection
ends while its checks run gets nothing queued (it never saw a 250 and will send again), and
its checks are stopped: the session cancels `run_checks`' Deferred, which cancels the check
in progress (a scanner's connection is closed, a DNS question dropped) and runs no further
one. (A client that only shuts down its sending side may still read the reply: it is
answered, so its checks run to the end.)

The sendmail command and bounces do not pass here (no SMTP session): they are signed by the
same signing core (mailauth/sign.py) at their own injection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.smtp.replies import Reply

# What a failing check turns into (the client tries again; nothing is queued unchecked).
CHECK_FAILED = Reply(451, "4.3.0", "sorry, temporary failure checking the message (#4.3.0)")

log = Logger(namespace="mailappliance.smtp")


@dataclass(frozen=True)
class Transaction:
    """What a check may know of the message's transaction (everything but its bytes)."""

    sender: str                       # "" for the null reverse path
    recipients: tuple[str, ...]
    client_ip: str                    # "" for a unix-socket client
    helo: str                         # "" when the client sent none
    listener: str                     # "smtp", "submission", "submissions"
    authenticated: bool               # SMTP AUTH succeeded
    relay_client: bool                # RELAYCLIENT from the rules, or a roaming (POP) grant
    spf: Any = None                   # mailauth's SPFResult of MAIL FROM, None when unchecked
    hostname: str = ""                # ours ([hostname])

    @property
    def trusted(self) -> bool:
        """Our own users and clients (verification skips them, signing serves them)."""
        return self.authenticated or self.relay_client


@dataclass(frozen=True)
class Outcome:
    reply: Reply | None = None        # refuse or tempfail: what the client gets
    headers: bytes = b""              # accept: fields to put on top (LF line ends)
    message: bytes | None = None      # accept: the message to go on with (None: unchanged)
    note: str = ""                    # one line for the mail log, or ""

    @property
    def accepted(self) -> bool:
        return self.reply is None


def accept(headers: bytes = b"", message: bytes | None = None, note: str = "") -> Outcome:
    return Outcome(None, headers, message, note)


def refuse(reply: Reply, note: str = "") -> Outcome:
    if reply.code // 100 != 5:
        raise ValueError(f"refuse() needs a 5xx reply, got {reply.code}")
    return Outcome(reply, note=note)


def tempfail(reply: Reply, note: str = "") -> Outcome:
    if reply.code // 100 != 4:
        raise ValueError(f"tempfail() needs a 4xx reply, got {reply.code}")
    return Outcome(reply, note=note)


class EndOfDataCheck(Protocol):
    """One check of app.end_of_data."""

    name: str                         # for the log: "mailauth", "dkim-sign", "scan"

    def wants(self, tx: Transaction) -> bool:
        """At DATA: does this transaction need the check? Cheap, no I/O. True makes the
        session hold the message in memory and run the check after the final dot."""

    def check(self, tx: Transaction, message: bytes) -> Outcome | Deferred:
        """The message as it would be queued (LF line ends, our Received: on top, the fields
        of the checks before this one added). -> Outcome, or a Deferred of one."""


@dataclass
class Result:
    """What run_checks ends with: the final message and the reply to give when refused."""

    message: bytes
    reply: Reply | None = None
    notes: list[str] = field(default_factory=list)


def wanted(checks: Sequence[EndOfDataCheck], tx: Transaction) -> list[EndOfDataCheck]:
    return [c for c in checks if c.wants(tx)]


def run_checks(checks: Sequence[EndOfDataCheck], tx: Transaction,
               message: bytes) -> Deferred:
    """Deferred[Result]: the checks one after the other, each on the previous one's result.
    Never fails (a failing check is CHECK_FAILED)."""
    return defer.ensureDeferred(_run(list(checks), tx, message))


async def _run(checks: list[EndOfDataCheck], tx: Transaction, message: bytes) -> Result:
    result = Result(message)
    for c in checks:
        try:
            outcome = c.check(tx, result.message)
            if isinstance(outcome, Deferred):
                outcome = await outcome
        except defer.CancelledError:
            raise                           # the session ended: nobody waits for a verdict
        except Exception:
            log.failure("end-of-data check {name} failed: rip={ip}", Failure(),
                        ip=tx.client_ip, name=c.name)
            result.reply = CHECK_FAILED
            return result
        if not isinstance(outcome, Outcome):
            log.error("end-of-data check {name} gave {o!r}: rip={ip}", ip=tx.client_ip,
                      name=c.name, o=outcome)
            result.reply = CHECK_FAILED
            return result
        if outcome.note:
            result.notes.append(outcome.note)
        if outcome.reply is not None:
            result.reply = outcome.reply
            return result
        if outcome.message is not None:
            result.message = outcome.message
        if outcome.headers:
            result.message = outcome.headers + result.message
    return result


class HeldMessage:
    """The message of a transaction whose checks need all of it: kept in memory (the SMTP
    core stops passing bytes beyond databytes), then given to the checks and injected whole.
    Quacks like queue/inject.py's MessageWriter for the session's DATA loop."""

    __slots__ = ("_chunks", "size")

    pending_bytes = 0                 # never makes the session wait for a disk

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if chunk:
            self._chunks.append(bytes(chunk))
            self.size += len(chunk)

    def data(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks = [data]
        return data

    def abort(self) -> None:
        self._chunks = []
