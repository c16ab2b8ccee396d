"""The queue manager (qmail-send): picks up committed messages, schedules deliveries, retries,
bounces, and removes what is done.

* Pick-up: at once when the injector reports a commit (`notify`), when another process (the
  sendmail command) pokes the trigger socket queue/trigger (qmail's lock/trigger), and by a
  periodic scan of queue/mess as a safety net.
* Per-recipient state lives in the queue file (store.py): a recipient is marked delivered or
  failed, with an fsync, as soon as its attempt ends, so after a crash only the recipients
  not yet marked are tried again.
* Two channels with their own limits (``concurrency_local``, ``concurrency_remote``): a slow
  remote host can use up remote slots only, never local ones.  Remote recipients of one
  message with the same domain go in one SMTP transaction (one remote slot).
* Deferred recipients are retried on qmail's schedule (schedule.py); the next try is kept as
  the file's mtime, so a restart resumes the schedule.  After ``lifetime`` one last attempt,
  then the recipient fails with qmail's "I'm not going to try again" text.
* Deliverers (delivery/interfaces.py ILocalDeliverer, IRemoteDeliverer) are handed to the
  manager; each delivery gets the envelope, its recipients' indices and the store as its
  message source (IMessageSource: read or open the queued message, or the bytes kept in
  memory since injection), so delivery never imports the queue.
* When no recipient is left to do: failures are bounced (bounce.py), then the file goes.
* A file that does not parse is moved to queue/corrupt/ with a log line; it never stops the
  server.  Leftovers of injections that never completed are removed after 36 hours.

The log lines are qmail-send's, so existing qmail log tools (qmailanalog) keep working::

    new msg N
    info msg N: bytes B from <s> qp Q uid U
    starting delivery D: msg N to local|remote R
    delivery D: success|deferral|failure: text
    status: local l/L remote r/R
    bounce msg N qp Q
    triple bounce: discarding bounce/N
    end msg N

Report texts are made log-safe as qmail-send does: newline -> '/', space -> '_', other
bytes outside printable ASCII -> '?'.

All timing uses the reactor passed in (IReactorTime), so tests drive it with task.Clock.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.batching import Batcher
from mailappliance.delivery.interfaces import ILocalDeliverer, IRemoteDeliverer
from mailappliance.envelope import (
    DEFERRAL, DELIVERED, FAILED, FAILURE, SUCCESS, TODO, CorruptEntry, Envelope, Result,
    deferral, failure)
from mailappliance.queue import bounce as bounce_mod
from mailappliance.queue import naming, schedule
from mailappliance.queue.schedule import LOCAL, REMOTE
from mailappliance.queue.store import QueueStore

# Periodic scan of queue/mess for messages whose trigger was lost (qmail-send rescans its
# todo directory on a timer as well).  A minute keeps a lost trigger's delay small and the
# cost (one listdir) negligible.
SCAN_INTERVAL = 60.0
# Removal of stale tmp/ files (36 h old, see store.TMP_MAX_AGE) is checked hourly.
CLEANUP_INTERVAL = 3600.0
# A bounce that could not be injected (disk full) is tried again after this long.
BOUNCE_RETRY = 60.0
# A message whose envelope could not be read for a passing reason (EIO, EMFILE) is tried
# again after this long.
PICKUP_RETRY = 60.0
# Recipients per SMTP transaction: RFC 5321 4.5.3.1.8 requires servers to take at least 100.
REMOTE_MAX_RCPTS = 100
# Log lines carry at most this many bytes of a report (a hostile server's reply is bounded
# by the SMTP client as well).
LOG_TEXT_MAX = 1000

TEXT_INTERNAL = "Internal delivery error; will try again. (#4.3.0)"
TEXT_REMOVED = "The administrator removed this message from the queue. (#5.0.0)"


def logsafe(text: str, limit: int = LOG_TEXT_MAX) -> str:
    out = []
    for ch in text[:limit]:
        if ch == "\n":
            out.append("/")
        elif ch == " ":
            out.append("_")
        elif " " < ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    return "".join(out)


def logsafe_address(address: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in address[:LOG_TEXT_MAX])


@dataclass
class Job:
    env: Envelope
    channel: dict[int, str]                      # TODO recipient index -> LOCAL | REMOTE
    busy: set[int] = field(default_factory=set)  # indices with an attempt in flight
    next_try: dict[str, float] = field(default_factory=dict)
    finishing: bool = False

    @property
    def qid(self) -> int:
        return self.env.qid

    def todo(self, channel: str) -> list[int]:
        return [i for i, ch in self.channel.items()
                if ch == channel and i not in self.busy
                and self.env.recipients[i].state == TODO]

    def pending(self) -> bool:
        return any(r.state == TODO for r in self.env.recipients)


class _Trigger(DatagramProtocol):
    noisy = False         # no "Starting protocol" line in the mail log
    def __init__(self, manager: "QueueManager") -> None:
        self.manager = manager

    def datagramReceived(self, data, addr) -> None:
        self.manager.scan_soon()


class QueueManager(service.Service):
    log = Logger()

    def __init__(self, store: QueueStore, *, local: ILocalDeliverer, remote: IRemoteDeliverer,
                 injector, reactor, threadpool,
                 classify: Callable[[str], str], postmaster: str, hostname: str,
                 concurrency_local: int = 10, concurrency_remote: int = 20,
                 lifetime: float = schedule.DEFAULT_LIFETIME, use_trigger: bool = True,
                 scan_interval: float = SCAN_INTERVAL,
                 sign_bounce: Callable[[bytes], Any] | None = None) -> None:
        self.store = store
        # DKIM: message -> Deferred[fields to put on top] or None (queue/service.py)
        self.sign_bounce = sign_bounce
        self._loaded: list[defer.Deferred] = []
        self._first_scan_done = False
        self.local = local
        self.remote = remote
        self.injector = injector
        self.reactor = reactor
        self.threadpool = threadpool
        self.classify = classify
        self.postmaster = postmaster
        self.hostname = hostname
        self.limit = {LOCAL: concurrency_local, REMOTE: concurrency_remote}
        self.lifetime = lifetime
        self.use_trigger = use_trigger
        self.scan_interval = scan_interval
        self.jobs: dict[int, Job] = {}
        self.picking: set[int] = set()               # pick-ups in flight
        self._stashed: set[int] = set()              # ids to look at again (see _clash)
        self.busy = {LOCAL: 0, REMOTE: 0}
        self.ready: dict[str, deque] = {LOCAL: deque(), REMOTE: deque()}
        self._in_ready: dict[str, set] = {LOCAL: set(), REMOTE: set()}
        self._wakeups: list[tuple[float, int, int, str]] = []
        self._wakeup_seq = itertools.count()
        self._timer = None
        self._delivery_no = itertools.count(1)
        self._scanning = False
        self._rescan = False
        self._remover = Batcher(lambda qids: self._defer(self._remove_many, qids),
                                max_batch=None)
        self._loops: list[task.LoopingCall] = []
        self._trigger_port = None
        self.stats = {"messages_seen": 0, "deliveries": 0, "success": 0, "deferral": 0,
                      "failure": 0, "bounces": 0, "double_bounces": 0, "triple_bounces": 0,
                      "corrupt": 0, "tmp_removed": 0}

    # -- service ----------------------------------------------------------------------------------
    def when_loaded(self) -> defer.Deferred:
        """Fires once the queue left on disk has been scanned after start."""
        if self._first_scan_done:
            return defer.succeed(None)
        d = defer.Deferred()
        self._loaded.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        if self.use_trigger:
            self._listen_trigger()
        scan = task.LoopingCall(self.scan_soon)
        scan.clock = self.reactor
        scan.start(self.scan_interval, now=True)
        cleanup = task.LoopingCall(self.cleanup)
        cleanup.clock = self.reactor
        cleanup.start(CLEANUP_INTERVAL, now=True)
        self._loops = [scan, cleanup]

    def stopService(self):
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        port, self._trigger_port = self._trigger_port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None

    def _listen_trigger(self) -> None:
        path = self.store.trigger_path
        try:
            if os.path.exists(path):
                os.unlink(path)    # left by a server that was killed
            self._trigger_port = self.reactor.listenUNIXDatagram(path, _Trigger(self))
        except Exception as e:  # noqa: BLE001 - e.g. path too long for a unix socket
            self.log.warn("queue trigger unavailable ({why}); relying on the periodic scan",
                          why=str(e))

    def _defer(self, f, *args, **kw) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.threadpool, f, *args, **kw)

    def now(self) -> float:
        return self.reactor.seconds()

    def set_limits(self, concurrency_local: int, concurrency_remote: int,
                   lifetime: float) -> None:
        """After a reload: new limits apply to the next deliveries started."""
        self.limit = {LOCAL: concurrency_local, REMOTE: concurrency_remote}
        self.lifetime = lifetime
        self._pump()

    # -- status for admin -------------------------------------------------------------------------
    def status(self) -> dict:
        return {"messages": len(self.jobs) + len(self.picking),
                "unprocessed": len(self.picking),
                "local_busy": self.busy[LOCAL], "local_max": self.limit[LOCAL],
                "remote_busy": self.busy[REMOTE], "remote_max": self.limit[REMOTE]}

    def list(self) -> defer.Deferred:
        """-> Deferred[list[QueueEntry]] (qmail-qread)."""
        return self._defer(self.store.entries)

    def _log_status(self) -> None:
        self.log.info("status: local {l}/{L} remote {r}/{R}", l=self.busy[LOCAL],
                      L=self.limit[LOCAL], r=self.busy[REMOTE], R=self.limit[REMOTE])

    # -- pick-up ------------------------------------------------------------------------------------
    def notify(self, qid: int) -> None:
        """The injector committed `qid` (in this process): deliver it now."""
        if self.running:
            self._pickup(qid)

    def notify_envelope(self, env: Envelope) -> None:
        """The injector committed `env` (in this process) and hands over the envelope it
        wrote: deliver it now without reading the file back.  Classifying the recipients is
        one primary-key lookup per domain in the user store's SQLite (WAL readers never wait
        for writers), small enough for the reactor thread."""
        if not self.running:
            env.data = None
            return
        if env.qid in self.jobs or env.qid in self.picking:
            env.data = None
            self._clash(env.qid, env.token)
            return
        try:
            channels = {r.index: self.classify(r.address)
                        for r in env.recipients if r.state == TODO}
        except Exception as e:  # noqa: BLE001 - the store is unreadable: take the slow path
            env.data = None
            self.log.warn("classifying msg {qid} failed ({why}); reading it again",
                          qid=_name(env), why=str(e))
            self._pickup(env.qid)
            return
        # Its bytes stay in memory for the first deliveries (capped; released below).
        self.store.keep_data(env)
        self.picking.add(env.qid)
        self._picked((env, channels, env.birth))

    def scan_soon(self) -> None:
        if not self.running:
            return
        if self._scanning:
            self._rescan = True
            return
        self._scanning = True
        d = self._defer(self.store.list_ids)

        def got(ids):
            for qid in ids:
                self._pickup(qid)

        def done(result):
            self._scanning = False
            if isinstance(result, Failure):
                self.log.error("queue scan failed: {why}", why=result.getErrorMessage())
            # Readiness (ready.json, sd_notify READY=1) waits for the first scan: every message
            # left by the last run is picked up before the server says it is ready.
            loaded, self._loaded = self._loaded, []
            for waiter in loaded:
                waiter.callback(None)
            self._first_scan_done = True
            if self._rescan:
                self._rescan = False
                self.scan_soon()

        d.addCallback(got)
        d.addBoth(done)

    def _clash(self, qid: int, token: str | None) -> None:
        """A message with the id of one we are still busy with.  Ids are inode numbers, and
        an inode is reused as soon as a finished message's file is unlinked -- possibly
        before we have forgotten that message.  Remember to look at the file again (from
        disk, so nothing is picked up twice) once the old one is forgotten."""
        job = self.jobs.get(qid)
        if job is not None and job.env.token == token:
            return                       # the same message, already known
        self._stashed.add(qid)

    def _forget(self, qid: int) -> None:
        """The message `qid` is finished (or could not be read): drop it, then look at a
        newer message that came with the same id meanwhile."""
        job = self.jobs.pop(qid, None)
        if job is not None:
            self.store.release_data(job.env)
        if qid in self._stashed and qid not in self.picking:
            self._stashed.discard(qid)
            self._pickup(qid)

    def _pickup(self, qid: int) -> None:
        if qid in self.jobs or qid in self.picking:
            self._clash(qid, None)
            return
        self.picking.add(qid)
        d = self._defer(self._read, qid)
        d.addCallbacks(self._picked, self._pick_failed, errbackArgs=(qid,))
        d.addErrback(self._bug, "pick-up of msg %d" % qid)

    def _read(self, qid: int):
        env = self.store.read_envelope(qid)
        channels = {}
        for r in env.recipients:
            if r.state == TODO:
                channels[r.index] = self.classify(r.address)
        return env, channels, self.store.next_try(qid)

    def _pick_failed(self, f: Failure, qid: int) -> None:
        self.picking.discard(qid)
        if f.check(FileNotFoundError):
            self._forget(qid)
            return      # removed meanwhile (done, or an admin removed it)
        if f.check(CorruptEntry):
            self.stats["corrupt"] += 1

            def moved(dst):
                self.log.warn("warning: msg {qid} is corrupt ({why}); moved to {dst}",
                              qid=qid, why=f.getErrorMessage(), dst=dst)

            def not_moved(g):
                self.log.error("msg {qid} is corrupt ({why}) and cannot be moved aside: {err}",
                               qid=qid, why=f.getErrorMessage(), err=g.getErrorMessage())

            self._defer(self.store.move_corrupt, qid).addCallbacks(moved, not_moved)
            return
        self.log.error("trouble reading msg {qid}: {why}; will try again",
                       qid=qid, why=f.getErrorMessage())
        self.reactor.callLater(PICKUP_RETRY, self.notify, qid)

    def _picked(self, result) -> None:
        env, channels, mtime = result
        qid = env.qid
        self.picking.discard(qid)
        if not self.running:
            return
        if qid in self.jobs:
            self._clash(qid, env.token)
            return
        job = Job(env, channels)
        self.jobs[qid] = job
        self.stats["messages_seen"] += 1
        if env.received_from:
            self.log.info("new msg {qid}: {trace}", qid=_name(env),
                          trace=logsafe_address(env.received_from))
        else:
            self.log.info("new msg {qid}", qid=_name(env))
        self.log.info("info msg {qid}: bytes {size} from <{sender}> qp {qp} uid {uid}",
                      qid=_name(env), size=env.size, sender=logsafe_address(env.sender),
                      qp=env.qp, uid=env.uid)
        now = self.now()
        # A deferred message keeps its schedule across a restart (mtime = next try).  The
        # earliest retry is birth + 100 s (local chanskip 10, squared), so an mtime before that
        # is the commit itself: deliver now.  A time beyond the lifetime is not trusted.
        deferred_before = mtime >= env.birth + schedule.CHANSKIP[LOCAL] ** 2
        start = mtime if deferred_before and now < mtime <= env.birth + self.lifetime else now
        for ch in (LOCAL, REMOTE):
            if job.todo(ch):
                self._schedule(job, ch, start)
        if not job.pending():
            self._finish(job)
        self._pump()

    # -- scheduling ---------------------------------------------------------------------------------
    def _schedule(self, job: Job, channel: str, when: float) -> None:
        job.next_try[channel] = when
        if when <= self.now():
            self._make_ready(job.qid, channel)
        else:
            heapq.heappush(self._wakeups, (when, next(self._wakeup_seq), job.qid, channel))
            self._arm()

    def _make_ready(self, qid: int, channel: str) -> None:
        if qid not in self._in_ready[channel]:
            self._in_ready[channel].add(qid)
            self.ready[channel].append(qid)

    def _arm(self) -> None:
        if not self._wakeups or not self.running:
            return
        when = self._wakeups[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= when:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, when - self.now()), self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.now()
        while self._wakeups and self._wakeups[0][0] <= now:
            when, _s, qid, channel = heapq.heappop(self._wakeups)
            job = self.jobs.get(qid)
            if job is not None and job.next_try.get(channel, 0) <= now:
                self._make_ready(qid, channel)
        self._arm()
        self._pump()

    def flush(self, qid: int | None = None, domain: str | None = None) -> int:
        """Retry deferred recipients now (mailappliance queue flush): all, those of message
        `qid`, or those at `domain`; -> messages."""
        now = self.now()
        n = 0
        jobs = list(self.jobs.values()) if qid is None else \
            [j for j in (self.jobs.get(qid),) if j is not None]
        domain = domain.lower().rstrip(".") if domain else None
        for job in jobs:
            if domain is not None and not any(
                    _domain(job.env.recipients[i].address) == domain
                    for ch in (LOCAL, REMOTE) for i in job.todo(ch)):
                continue
            due = [ch for ch in (LOCAL, REMOTE) if job.todo(ch)]
            for ch in due:
                job.next_try[ch] = now
                self._make_ready(job.qid, ch)
            n += bool(due)
        self.scan_soon()
        self._pump()
        return n

    def _pump(self) -> None:
        if not self.running:
            return
        for channel in (LOCAL, REMOTE):
            ready = self.ready[channel]
            while self.busy[channel] < self.limit[channel] and ready:
                qid = ready[0]
                job = self.jobs.get(qid)
                todo = job.todo(channel) if job is not None and not job.finishing else []
                if not todo:
                    ready.popleft()
                    self._in_ready[channel].discard(qid)
                    continue
                if channel == LOCAL:
                    unit = todo[:1]
                else:
                    domain = _domain(job.env.recipients[todo[0]].address)
                    unit = [i for i in todo
                            if _domain(job.env.recipients[i].address) == domain]
                    unit = unit[:REMOTE_MAX_RCPTS]
                if len(unit) == len(todo):
                    ready.popleft()
                    self._in_ready[channel].discard(qid)
                self._start(job, channel, unit)

    def _start(self, job: Job, channel: str, unit: list[int]) -> None:
        env = job.env
        job.busy.update(unit)
        self.busy[channel] += 1
        dnos = []
        for i in unit:
            dno = next(self._delivery_no)
            dnos.append(dno)
            self.stats["deliveries"] += 1
            self.log.info("starting delivery {d}: msg {qid} to {channel} {rcpt}", d=dno,
                          qid=_name(env), channel=channel,
                          rcpt=logsafe_address(env.recipients[i].address))
        self._log_status()
        started = self.now()
        if channel == LOCAL:
            d = defer.maybeDeferred(self.local.deliver, env, unit[0], self.store)
            d.addCallback(lambda r: [r])
        else:
            d = defer.maybeDeferred(self.remote.deliver, env, unit, self.store)
        d.addBoth(self._attempt_done, job, channel, unit, dnos, started)
        d.addErrback(self._bug, "completion of msg %d" % env.qid)

    # -- results --------------------------------------------------------------------------------------
    def _attempt_done(self, results, job: Job, channel: str, unit: list[int], dnos: list[int],
                      started: float):
        if isinstance(results, Failure):
            self.log.failure("delivery of msg {qid} raised", results, qid=_name(job.env))
            results = [deferral(TEXT_INTERNAL)] * len(unit)
        if len(results) != len(unit):
            self.log.error("deliverer returned {n} results for {m} recipients",
                           n=len(results), m=len(unit))
            results = [deferral(TEXT_INTERNAL)] * len(unit)
        env = job.env
        dying = schedule.is_dying(env.birth, started, self.lifetime)
        final: list[tuple[int, Result]] = []
        deferred_any = False
        for i, dno, res in zip(unit, dnos, results):
            if res.status == DEFERRAL and dying:
                res = failure(res.text.rstrip("\n") + "\n" + schedule.TOO_LONG)
            self.stats[res.status] += 1
            self.log.info("delivery {d}: {status}: {text}", d=dno, status=res.status,
                          text=logsafe(res.text))
            final.append((i, res))
            deferred_any = deferred_any or res.status == DEFERRAL
        # What will be left after this attempt (decided here, on the reactor thread).
        remaining = [r.index for r in env.recipients
                     if r.state == TODO and r.index not in unit] + \
            [i for i, res in final if res.status == DEFERRAL]
        nothing_failed = (all(res.status != FAILURE for _, res in final)
                          and not any(r.state == FAILED for r in env.recipients))
        next_try = None
        if deferred_any:
            next_try = schedule.next_attempt(env.birth, self.now(), channel, self.lifetime)
        if not job.busy.difference(unit):
            # No other delivery of it in flight: later attempts read the queue file.
            self.store.release_data(env)
        if not remaining and nothing_failed and not job.busy.difference(unit):
            # Everything delivered: no marks needed, the message just goes.
            d = self._remove_soon(env.qid, env.bounce_file)
            done_all = True
        else:
            pending = [t for ch, t in job.next_try.items()
                       if ch != channel and job.todo(ch)]
            if next_try is not None:
                pending.append(next_try)
            d = self._defer(self._persist, env, final, min(pending) if pending else None)
            done_all = False
        # The delivery itself is over: its concurrency slot is free now, as qmail-send counts
        # a slot per running qmail-local/qmail-remote, not for its own bookkeeping. The unit's
        # recipients stay busy in the job until their result is on disk, so none of them can
        # start again before that.
        self.busy[channel] -= 1
        self._log_status()
        d.addBoth(self._persisted, job, channel, unit, final, next_try, done_all)
        self._pump()
        return d

    def _remove_soon(self, qid: int, bounce_file: bool = True) -> defer.Deferred:
        """Remove a finished message; removals that pile up while one batch is being removed
        go together in the next (one thread hand-off for many messages under load)."""
        return self._remover.submit((qid, bounce_file))

    def _remove_many(self, items: list[tuple[int, bool]]) -> list[None]:
        """In a thread: remove the messages; an error fails the whole batch (as before)."""
        self.store.remove_many(items)
        return [None] * len(items)

    def _persist(self, env: Envelope, final, next_try: float | None) -> None:
        """In a thread: failures (bounce record, then F mark), then delivered marks, then the
        next-try time as mtime.  The in-memory states change only after the disk did."""
        for i, res in final:
            if res.status == FAILURE:
                self.store.add_failure(env, i, res.text)
        # What `queue list` shows: attempts, last try and text (no fsync; information only).
        deferred = [(i, res.text) for i, res in final if res.status == DEFERRAL]
        if deferred:
            try:
                self.store.record_deferrals(env, deferred)
            except OSError as e:
                self.log.warn("cannot record the deferral of msg {qid}: {why}",
                              qid=_name(env), why=e.strerror or str(e))
        self.store.mark(env, [(i, DELIVERED) for i, res in final if res.status == SUCCESS])
        if next_try is not None:
            self.store.set_next_try(env.qid, next_try)

    def _persisted(self, result, job: Job, channel: str, unit, final, next_try, done_all):
        job.busy.difference_update(unit)
        if isinstance(result, Failure):
            # Not recorded: everything in this unit stays to do (a delivered recipient may
            # get a duplicate, never a loss).
            self.log.error("cannot record delivery results of msg {qid}: {why}",
                           qid=_name(job.env), why=result.getErrorMessage())
            next_try = schedule.next_attempt(job.env.birth, self.now(), channel,
                                             self.lifetime)
        if done_all and not isinstance(result, Failure):
            self.log.info("end msg {qid}", qid=_name(job.env))
            self._forget(job.qid)
            self._pump()
            return
        if job.todo(channel) and next_try is not None:
            self._schedule(job, channel, next_try)
        elif job.todo(channel):
            self._make_ready(job.qid, channel)
        if not job.pending() and not job.busy:
            self._finish(job)
        self._pump()

    # -- end of a message: bounce, remove ----------------------------------------------------------
    def _finish(self, job: Job) -> None:
        if job.finishing:
            return
        job.finishing = True
        d = self._bounce_and_remove(job)
        d.addErrback(self._bug, "end of msg %d" % job.qid)

    @defer.inlineCallbacks
    def _bounce_and_remove(self, job: Job):
        env = job.env
        if any(r.state == FAILED for r in env.recipients):
            ok = yield self._bounce(env)
            if not ok:
                job.finishing = False
                self.reactor.callLater(BOUNCE_RETRY, self._retry_finish, env.qid)
                return
        yield self._defer(self.store.remove, env.qid)
        self.log.info("end msg {qid}", qid=_name(env))
        self._forget(env.qid)

    def _retry_finish(self, qid: int) -> None:
        job = self.jobs.get(qid)
        if job is not None and self.running:
            self._finish(job)

    @defer.inlineCallbacks
    def _bounce(self, env: Envelope):
        """Inject the bounce for env's failures; True when done (or dropped as a triple)."""
        target = bounce_mod.bounce_envelope(env.sender, self.postmaster)
        if target is None:
            self.stats["triple_bounces"] += 1
            self.log.warn("triple bounce: discarding bounce/{qid}", qid=_name(env))
            return True
        b_sender, b_rcpt = target
        try:
            failures, original = yield self._defer(self._bounce_material, env)
        except Exception as e:  # noqa: BLE001
            self.log.error("cannot read msg {qid} to bounce it: {why}", qid=_name(env), why=str(e))
            return False
        data, truncated = original
        text = bounce_mod.bounce_message(
            hostname=self.hostname, sender=env.sender, recipient=b_rcpt, failures=failures,
            original=data, truncated=truncated, now=self.now(),
            message_id="%d.%d.bounce" % (int(self.now()), env.qid), arrival=env.birth)
        if self.sign_bounce is not None:
            try:
                fields = yield self.sign_bounce(text)
            except Exception:  # noqa: BLE001 - an unsigned bounce beats none
                self.log.failure("cannot sign the bounce of msg {qid}", qid=env.qid)
                fields = None
            text = (fields or b"") + text
        try:
            bqid = yield self.injector.inject(text, b_sender, [b_rcpt])
        except Exception as e:  # noqa: BLE001 - QueueWriteError: try again later
            self.log.error("unable to inject bounce of msg {qid}: {why}; will try again",
                           qid=_name(env), why=str(e))
            return False
        self.stats["double_bounces" if b_sender else "bounces"] += 1
        self.log.info("bounce msg {qid} qp {qp}", qid=_name(env), qp=bqid)
        return True

    def _bounce_material(self, env: Envelope):
        recorded = self.store.failures(env)
        failures = []
        for r in env.recipients:
            if r.state == FAILED:
                addr, text = recorded.get(r.index, (r.address, "Delivery failed. (#5.0.0)"))
                failures.append((addr, text))
        with self.store.open_message(env) as reader:
            data = reader.read(bounce_mod.BOUNCE_MAX_COPY + 1)
        return failures, (data, len(data) > bounce_mod.BOUNCE_MAX_COPY)

    # -- admin: small queries ---------------------------------------------------------------------
    def oldest_birth(self) -> float | None:
        """Arrival time of the oldest message the manager holds (metrics' queue age)."""
        return min((job.env.birth for job in self.jobs.values()), default=None)

    def in_delivery(self, qid: int) -> frozenset[int]:
        """Indices of msg `qid`'s recipients with an attempt in flight (or all of them while
        it is being bounced and removed); empty when none or unknown."""
        job = self.jobs.get(qid)
        if job is None:
            return frozenset()
        if job.finishing:
            return frozenset(r.index for r in job.env.recipients)
        return frozenset(job.busy)

    # -- admin: remove ----------------------------------------------------------------------------
    @defer.inlineCallbacks
    def remove(self, qid: int, bounce: bool = False):
        """Remove a message (admin).  With bounce, its undelivered recipients are bounced with
        TEXT_REMOVED.  -> Deferred[bool]: False when unknown or a delivery is in flight."""
        job = self.jobs.get(qid)
        if job is None:
            if qid in self.picking:
                return False
            try:
                env, channels, _m = yield self._defer(self._read, qid)
            except Exception:  # noqa: BLE001
                return False
            if qid in self.jobs:
                return False
            job = Job(env, channels)
            self.jobs[qid] = job
        if job.busy or job.finishing:
            return False
        job.finishing = True
        todo = [r.index for r in job.env.recipients if r.state == TODO]
        if bounce and todo:
            yield self._defer(self._persist, job.env,
                              [(i, failure(TEXT_REMOVED)) for i in todo], None)
            job.finishing = False
            self._finish(job)
        else:
            yield self._defer(self.store.remove, qid)
            self.log.info("end msg {qid}", qid=_name(job.env))
            self._forget(qid)
        return True

    # -- housekeeping ---------------------------------------------------------------------------
    def cleanup(self) -> None:
        def done(removed):
            self.stats["tmp_removed"] += len(removed)
            for path in removed:
                self.log.info("removed stale queue file {path}", path=path)

        d = self._defer(self.store.cleanup, None)
        d.addCallbacks(done, lambda f: self.log.error("queue cleanup failed: {why}",
                                                      why=f.getErrorMessage()))

    def _bug(self, f: Failure, what: str) -> None:
        self.log.failure("queue manager: unexpected error in {what}", f, what=what)


def _name(env: Envelope) -> str:
    """The message's id in the log (queue/naming.py message_name: never reused)."""
    return naming.message_name(env.qid, env.token)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def make_classifier(users, hostname: str) -> Callable[[str], str]:
    """address -> LOCAL when its domain is one of ours (or the host name), else REMOTE.
    Blocking (SQLite); the manager calls it in a thread."""
    me = hostname.lower().rstrip(".")

    def classify(address: str) -> str:
        domain = _domain(address)
        if domain == me or users.has_domain(domain):
            return LOCAL
        return REMOTE
    return classify
