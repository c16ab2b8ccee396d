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
* Remote deliveries are queued per destination (the recipient domain, or the host of its
  ``[routes]`` entry) and started round robin among destinations, at most
  ``concurrency_destination`` at once to one destination (Postfix's
  default_destination_concurrency_limit), so one slow destination cannot take every remote
  slot.
* Dead destinations (Postfix's): when an attempt reaches no server of its destination at all
  (`destination_down`: no connection, or no DNS answer), the destination is dead for a while
  (DEAD_RETRY_MIN doubling up to DEAD_RETRY_MAX): its other messages are deferred at once,
  without a connection each, with a text that says so.  When that time is up one message
  tries (one delivery at a time); if it reaches the destination, every message waiting for
  that destination is due at once, so the backlog drains at full speed.
* Bounded memory whatever the queue's length (Postfix's active queue limit): at most
  ``active_limit`` messages are held in memory (the active window: being delivered, due, or
  due within a minute); every other message is a 24-byte entry of the backlog (backlog.py:
  queue id, next try, birth, destination).  At start the queue directory is loaded in the
  background, LOAD_BATCH files per thread call, while SMTP is served; readiness waits for it.
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
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

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
from mailappliance.queue.backlog import BUCKET_SECONDS, Backlog
from mailappliance.queue.schedule import LOCAL, REMOTE
from mailappliance.queue.store import QueueStore

# Periodic scan of queue/mess for messages whose trigger was lost (qmail-send rescans its
# todo directory on a timer as well).  A minute keeps a lost trigger's delay small; the scan
# stats every file (about 2 us each: 2 s of one thread a minute for a million) and picks up
# only those changed since the scan before (store.changed_since).
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
# Messages held in memory at once (the active window), like Postfix's
# qmgr_message_active_limit (20,000 there).  A message in memory costs about 3.5 KB (its
# envelope, recipients and bookkeeping: 408 MB for 100,000 measured before the window), so
# 10,000 cost about 35 MB; every other message is a 24-byte backlog entry (backlog.py).  The
# window only has to be wide enough to keep every delivery slot busy (concurrency_local +
# concurrency_remote: at most 2,000) with room for the messages deferred within a minute.
ACTIVE_LIMIT = 10_000
# Remote deliveries at once to one destination when the manager is given no limit: Postfix's
# default_destination_concurrency_limit is 20 of default_process_limit 100 (a fifth); a
# quarter of the default 20 remote slots keeps four slow destinations from taking them all.
DESTINATION_CONCURRENCY = 5
# A dead destination is left alone this long after its first failure, doubling with every
# failed retry up to the maximum: Postfix's minimal_backoff_time and maximal_backoff_time
# (300 s and 4000 s).  Its messages' own qmail schedule (schedule.py) still applies to them.
DEAD_RETRY_MIN = 300.0
DEAD_RETRY_MAX = 4000.0
# Queue files read per thread call while loading the queue at start: a thread call of about
# 30 ms (27 us an envelope), so the reactor thread serves SMTP between batches.
LOAD_BATCH = 1000
# Timers of messages that left the window stay in the timer heap until it is compacted, which
# happens once it holds this many more than twice the window's messages.
WAKEUPS_SLACK = 1000
# Backlog entries read into the window per thread call: fewer hand-offs, while a removal or
# a mark waiting for a thread never queues behind more than a few such calls.
PICK_BATCH = 64
# Batches of the load in flight at once: on a cold cache the disk serves several reads at once
# (the delivery pool has at least 3 threads; the rest stay free for deliveries).
LOAD_PARALLEL = 3
# Readiness (ready.json, sd_notify READY=1) waits for the queue's load at most this long.  A
# million messages on a cold page cache take minutes to read (a disk read each), and systemd
# kills a Type=notify service that is not ready within TimeoutStartSec (90 s by default):
# a long queue must never keep the server from starting.  SMTP is served meanwhile anyway.
LOAD_READY_WAIT = 30.0
# How long a finished message's removal that finds no removal under way waits for others to
# share its pool trip (the Batcher's gathering window), in seconds: none.  A removal is an
# unlink without fsync, so a window saves only the thread trip, and measured end to end it
# saved nothing (ab_bench, 1 session x 2 KiB, 5 pairs on a quiet machine: without the window
# 1.01x, range 0.93-1.09), while every message waiting in it is delivered a second time after a
# kill -9 (tests/integration/test_crash_delivery.py saw 28 duplicates with 10 ms).  Deliveries
# keep their window (delivery/local.py GATHER_WINDOW): there it saves a directory fsync.
REMOVAL_WINDOW = 0.0
# A deferred message due within this long stays in the window (with its exact timer); one due
# later leaves it for the backlog.  The backlog's bucket width: a message taken from a bucket
# that has begun is due within it.
RESIDENT_HORIZON = BUCKET_SECONDS

TEXT_INTERNAL = "Internal delivery error; will try again. (#4.3.0)"
TEXT_REMOVED = "The administrator removed this message from the queue. (#5.0.0)"
# The deferral of a message whose destination is dead, given without a connection attempt
# (Postfix: "delivery temporarily suspended: ..."), followed by the failure that killed it.
TEXT_SUSPENDED = ("Not tried: {dest} could not be reached {ago} s ago; next try there in "
                  "{left} s. (#4.4.1)")


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


@dataclass
class Destination:
    """One remote destination (a domain, or the host of a route): its deliveries in flight,
    the messages in the window waiting for it, and whether it is dead."""
    name: str
    busy: int = 0
    ready: deque = field(default_factory=deque)   # qids, first come first served
    queued: set = field(default_factory=set)      # the same qids, for membership
    dead_until: float = 0.0     # while later than now: dead, its messages wait without trying
    dead_since: float = 0.0
    backoff: float = 0.0        # the last dead period (0: alive)
    reason: str = ""            # the failure that killed it
    timer: object = None

    @property
    def probing(self) -> bool:
        """Its dead time is over but nothing has reached it yet: one delivery at a time."""
        return self.backoff > 0


class _Trigger(DatagramProtocol):
    noisy = False         # no "Starting protocol" line in the mail log
    def __init__(self, manager: "QueueManager") -> None:
        self.manager = manager

    def datagramReceived(self, data, addr) -> None:
        # b"!<qid>": that message was committed (store.pull_trigger); b"!" (or anything
        # else): look at the directory.  A lost datagram is found by the periodic scan.
        qid = data[1:]
        if data[:1] == b"!" and qid.isdigit() and len(qid) < 20:
            self.manager.notify(int(qid))
        else:
            self.manager.scan_soon()


def _never_down(result: Result) -> bool:
    return False


class _Lister:
    """The queue directory's files (QueueStore.scan) for several loading threads: one takes
    the next batch at a time."""

    def __init__(self, files) -> None:
        self._files = files
        self._lock = threading.Lock()
        self.done = False
        self.stop = False          # set by the reactor thread: the service stops

    def next(self, n: int) -> list:
        with self._lock:
            if self.done:
                return []
            out = [] if self.stop else list(itertools.islice(self._files, n))
            if len(out) < n:
                self.done = True
                self._files.close()
            return out


class QueueManager(service.Service):
    log = Logger()

    def __init__(self, store: QueueStore, *, local: ILocalDeliverer, remote: IRemoteDeliverer,
                 injector, reactor, threadpool,
                 classify: Callable[[str], str], postmaster: str, hostname: str,
                 concurrency_local: int = 10, concurrency_remote: int = 20,
                 concurrency_destination: int = DESTINATION_CONCURRENCY,
                 lifetime: float = schedule.DEFAULT_LIFETIME, use_trigger: bool = True,
                 scan_interval: float = SCAN_INTERVAL,
                 sign_bounce: Callable[[bytes], Any] | None = None,
                 active_limit: int = ACTIVE_LIMIT,
                 destination_of: Callable[[str], str] | None = None,
                 destination_down: Callable[[Result], bool] = _never_down,
                 load_batch: int = LOAD_BATCH, removal_window: float = 0.0) -> None:
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
        self.dest_limit = concurrency_destination
        self.lifetime = lifetime
        self.use_trigger = use_trigger
        self.scan_interval = scan_interval
        self.active_limit = active_limit
        self.load_batch = load_batch
        # domain -> destination name (the route's host when [routes] sends it elsewhere)
        self.destination_of = destination_of or (lambda domain: domain)
        # result -> True when the attempt reached no server of its destination at all
        self.destination_down = destination_down
        self.jobs: dict[int, Job] = {}                # the active window
        self.backlog = Backlog()                      # everything else
        self.picking: set[int] = set()               # pick-ups in flight
        self._stashed: set[int] = set()              # ids to look at again (see _clash)
        self.busy = {LOCAL: 0, REMOTE: 0}
        self.ready: deque = deque()                  # local: qids with a recipient due
        self._in_ready: set[int] = set()
        self.dests: dict[str, Destination] = {}
        self._turn: deque = deque()                  # destinations with work, round robin
        self._in_turn: set[str] = set()
        self._wakeups: list[tuple[float, int, int, str]] = []
        self._wakeup_seq = itertools.count()
        self._timer = None
        self._backlog_timer = None
        self._ready_timer = None
        self._delivery_no = itertools.count(1)
        self._scanning = False
        self._rescan = False
        self._scan_since: float | None = None        # wall time the last scan began
        self._pumping = False
        self._pump_again = False
        self._filling = False
        self._fill_again = False
        self._remover = Batcher(lambda qids: self._defer(self._remove_many, qids),
                                max_batch=None, window=removal_window, clock=reactor)
        self._loops: list[task.LoopingCall] = []
        self._trigger_port = None
        self.stats = {"messages_seen": 0, "deliveries": 0, "success": 0, "deferral": 0,
                      "failure": 0, "bounces": 0, "double_bounces": 0, "triple_bounces": 0,
                      "corrupt": 0, "tmp_removed": 0, "suspended": 0, "dead_destinations": 0}

    # -- service ----------------------------------------------------------------------------------
    def when_loaded(self) -> defer.Deferred:
        """Fires once the queue left on disk has been loaded after start, or after
        LOAD_READY_WAIT while it is still loading."""
        if self._first_scan_done or (self.running and self._ready_timer is None):
            return defer.succeed(None)
        d = defer.Deferred()
        self._loaded.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        if self.use_trigger:
            self._listen_trigger()
        self._load()
        scan = task.LoopingCall(self.scan_soon)
        scan.clock = self.reactor
        scan.start(self.scan_interval, now=False)
        cleanup = task.LoopingCall(self.cleanup)
        cleanup.clock = self.reactor
        cleanup.start(CLEANUP_INTERVAL, now=True)
        self._loops = [scan, cleanup]

    def stopService(self):
        super().stopService()
        # Nothing waits in a gathering window past the stop: deliveries and removals start now.
        self.local.flush()
        self._remover.flush()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for timer in (self._timer, self._backlog_timer, self._ready_timer,
                      *(d.timer for d in self.dests.values())):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._backlog_timer = None
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
                   lifetime: float, concurrency_destination: int | None = None) -> None:
        """After a reload: new limits apply to the next deliveries started."""
        self.limit = {LOCAL: concurrency_local, REMOTE: concurrency_remote}
        if concurrency_destination is not None:
            self.dest_limit = concurrency_destination
            for name, dest in self.dests.items():
                if dest.ready:
                    self._take_turn(name)
        self.lifetime = lifetime
        self._pump()

    # -- status for admin -------------------------------------------------------------------------
    def status(self) -> dict:
        return {"messages": len(self.jobs) + len(self.picking) + len(self.backlog),
                "unprocessed": len(self.picking),
                "active": len(self.jobs) + len(self.picking), "active_max": self.active_limit,
                "backlog": len(self.backlog), "loading": not self._first_scan_done,
                "dead": sorted(n for n, d in self.dests.items()
                               if d.dead_until > self.now()),
                "local_busy": self.busy[LOCAL], "local_max": self.limit[LOCAL],
                "remote_busy": self.busy[REMOTE], "remote_max": self.limit[REMOTE]}

    def list(self) -> defer.Deferred:
        """-> Deferred[list[QueueEntry]] (qmail-qread)."""
        return self._defer(self.store.entries)

    def _log_status(self) -> None:
        self.log.info("status: local {l}/{L} remote {r}/{R}", l=self.busy[LOCAL],
                      L=self.limit[LOCAL], r=self.busy[REMOTE], R=self.limit[REMOTE])

    # -- loading the queue at start ------------------------------------------------------------
    def _load(self) -> None:
        """Read the queue directory in the background, LOAD_BATCH files per thread call: each
        message becomes a backlog entry (due now or at its next try), and the window takes
        the due ones as it has room.  when_loaded fires at the end."""
        self._scanning = True
        self._scan_since = time.time()
        self._ready_timer = self.reactor.callLater(LOAD_READY_WAIT, self._ready_anyway)
        files = _Lister(self.store.scan())
        cache: dict[str, tuple[str, str | None]] = {}

        def batch(_=None):
            if not self.running:
                files.stop = True
                return None
            return self._defer(self._load_batch, files, cache).addCallback(got)

        def got(result):
            entries, more = result
            now = self.now()
            for qid, mtime, birth, dest, env, channels in entries:
                if qid in self.jobs or qid in self.picking:
                    continue            # injected after start, already in hand
                if birth is None:
                    self._pick_failed(mtime, qid)      # mtime is the Failure here
                    continue
                start = self._start_time(mtime, birth, now)
                if start <= now and self._room() > 0 and not self.backlog.due_count():
                    # due, and the window has room: no need to read it again
                    self.picking.add(qid)
                    self._picked((env, channels, mtime), start)
                    continue
                self.backlog.add(qid, start, birth, self.backlog.dest_id(dest), now)
            self._fill()
            if more:
                return batch()
            return None

        started = self.now()

        def done(result):
            if isinstance(result, Failure):
                self.log.error("queue load failed: {why}", why=result.getErrorMessage())
            else:
                self.log.info("queue loaded: {n} messages in {s} s ({m} in memory)",
                              n=len(self.backlog) + len(self.jobs) + len(self.picking),
                              s=round(self.now() - started, 1),
                              m=len(self.jobs) + len(self.picking))
            self._scan_done()

        # LOAD_PARALLEL batches in flight: on a cold cache the reads wait for the disk, which
        # serves several at once.
        chains = [d for d in (batch() for _ in range(LOAD_PARALLEL)) if d is not None]
        if not chains:
            self._scan_done()
        else:
            defer.gatherResults(chains, consumeErrors=True).addBoth(done)

    def _load_batch(self, files, cache) -> tuple[list, bool]:
        """In a thread: the next LOAD_BATCH messages as (qid, mtime, birth, destination or
        None); a message that cannot be read as (qid, Failure, None, None)."""
        out = []
        # In inode order: on a cold cache each read is a disk seek, and nearby inodes tend
        # to have nearby blocks (directory order is hash order).
        batch = sorted(files.next(self.load_batch))
        for qid, mtime, _ctime in batch:
            try:
                env = self.store.read_envelope(qid)
            except FileNotFoundError:
                continue
            except Exception:  # noqa: BLE001 - CorruptEntry, EIO: handled as a pick-up's
                out.append((qid, Failure(), None, None, None, None))
                continue
            channels = self._channels(env)
            out.append((qid, mtime, env.birth, self._single_destination(env, cache),
                        env, channels))
        return out, not files.done

    def _single_destination(self, env: Envelope, cache) -> str | None:
        """The one remote destination every recipient still to do waits for, or None."""
        dest = None
        for r in env.recipients:
            if r.state != TODO:
                continue
            domain = _domain(r.address)
            known = cache.get(domain)
            if known is None:
                channel = self.classify(r.address)
                known = cache[domain] = (
                    channel, self.destination_of(domain) if channel == REMOTE else None)
            channel, name = known
            if channel != REMOTE or (dest is not None and name != dest):
                return None
            dest = name
        return dest

    def _start_time(self, mtime: float, birth: float, now: float) -> float:
        """When a message read from disk is due.  A deferred message keeps its schedule
        across a restart (mtime = next try).  The earliest retry is birth + 100 s (local
        chanskip 10, squared), so an mtime before that is the commit itself: deliver now.
        A time beyond the lifetime is not trusted."""
        deferred_before = mtime >= birth + schedule.CHANSKIP[LOCAL] ** 2
        if deferred_before and now < mtime <= birth + self.lifetime:
            return mtime
        return now

    def _ready_anyway(self) -> None:
        """The load takes longer than LOAD_READY_WAIT: ready now, the load goes on."""
        self._ready_timer = None
        if self._loaded:
            self.log.warn("queue still loading after {s} s ({n} messages so far); ready "
                          "now, the rest loads in the background", s=LOAD_READY_WAIT,
                          n=len(self.backlog) + len(self.jobs))
            self._release_waiters()

    def _release_waiters(self) -> None:
        loaded, self._loaded = self._loaded, []
        for waiter in loaded:
            waiter.callback(None)

    def _scan_done(self) -> None:
        self._scanning = False
        # Readiness (ready.json, sd_notify READY=1) waits for the load: every message left
        # by the last run is known before the server says it is ready (or LOAD_READY_WAIT).
        self._first_scan_done = True
        if self._ready_timer is not None and self._ready_timer.active():
            self._ready_timer.cancel()
        self._ready_timer = None
        self._release_waiters()
        if self._rescan:
            self._rescan = False
            self.scan_soon()

    # -- the window -------------------------------------------------------------------------------
    def _room(self) -> int:
        return self.active_limit - len(self.jobs) - len(self.picking)

    def _fill(self) -> None:
        """Take due backlog entries into the window while it has room."""
        if not self.running:
            return
        if self._filling:
            self._fill_again = True
            return
        self._filling = True
        try:
            # Read in batches: with a full window each finished message frees one place,
            # and a thread call per message would cost more than the read.
            batch = min(PICK_BATCH, max(1, self.active_limit // 4))
            while True:
                self._fill_again = False
                room = self._room()
                if room >= batch or (room > 0 and self.active_limit - room < batch):
                    entries = self.backlog.take(self.now(), room)
                    for k in range(0, len(entries), PICK_BATCH):
                        self._pickup_many(entries[k:k + PICK_BATCH])
                if not self._fill_again:
                    break
        finally:
            self._filling = False
        self._arm_backlog()

    def _arm_backlog(self) -> None:
        when = self.backlog.next_time()
        timer = self._backlog_timer
        if when is None or not self.running:
            return
        if when <= self.now():
            # Due already but the window is full: the next message to leave it calls _fill
            # (a timer now would spin).
            return
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._backlog_timer = self.reactor.callLater(max(0.0, when - self.now()),
                                                     self._backlog_due)

    def _backlog_due(self) -> None:
        self._backlog_timer = None
        self._fill()

    def _maybe_evict(self, job: Job) -> None:
        """A message with nothing to do for a while leaves the window for the backlog."""
        if job.busy or job.finishing or job.qid not in self.jobs or not job.pending():
            return
        now = self.now()
        times = [job.next_try.get(ch, now) for ch in (LOCAL, REMOTE) if job.todo(ch)]
        if not times or min(times) <= now + RESIDENT_HORIZON:
            return
        dests = {self.destination_of(_domain(job.env.recipients[i].address))
                 if ch == REMOTE else None
                 for i, ch in job.channel.items() if job.env.recipients[i].state == TODO}
        dest = dests.pop() if len(dests) == 1 else None
        self.backlog.add(job.qid, min(times), job.env.birth, self.backlog.dest_id(dest), now)
        qid = job.qid
        self.jobs.pop(qid, None)
        self.store.release_data(job.env)
        if qid in self._stashed and qid not in self.picking:
            self._stashed.discard(qid)
            self._pickup(qid)
        self._fill()

    # -- pick-up ------------------------------------------------------------------------------------
    def notify(self, qid: int) -> None:
        """`qid` was committed (by the injector, or another process's trigger): deliver it
        now, or after what is due already when the window is full."""
        if not self.running:
            return
        if self._room() > 0 or qid in self.jobs or qid in self.picking:
            self._pickup(qid)
        else:
            self.backlog.add_due(qid, self.now(), self.now())

    def notify_envelope(self, env: Envelope) -> None:
        """The injector committed `env` (in this process) and hands over the envelope it
        wrote: deliver it now without reading the file back.  Classifying the recipients is
        one primary-key lookup per domain in the user store's SQLite (WAL readers never wait
        for writers), small enough for the reactor thread.  With the window full it waits in
        the backlog, first in first out, and is read back when its turn comes."""
        if not self.running:
            env.data = None
            return
        if env.qid in self.jobs or env.qid in self.picking:
            env.data = None
            self._clash(env.qid, env.token)
            return
        if self._room() <= 0:
            env.data = None
            self.backlog.add_due(env.qid, self.now(), env.birth)
            return
        try:
            channels = self._channels(env)
        except Exception as e:  # noqa: BLE001 - the store is unreadable: take the slow path
            env.data = None
            self.log.warn("classifying msg {qid} failed ({why}); reading it again",
                          qid=_name(env), why=str(e))
            self._pickup(env.qid)
            return
        # Its bytes stay in memory for the first deliveries (capped; released below).
        self.store.keep_data(env)
        self.picking.add(env.qid)
        self._picked((env, channels, env.birth), None)

    def scan_soon(self) -> None:
        """Look for messages another process committed (the sendmail command) whose trigger
        was lost: files changed since the last scan that the manager does not hold."""
        if not self.running:
            return
        if self._scanning:
            self._rescan = True
            return
        self._scanning = True
        since = self._scan_since
        self._scan_since = time.time()
        d = self._defer(self.store.changed_since, since)

        def got(ids):
            # Changed files are mostly the manager's own work (marks, next tries): those in
            # the window or the backlog are known already.
            new = set(ids).difference(self.jobs, self.picking)
            new -= self.backlog.known(new)
            for qid in sorted(new):
                self.notify(qid)

        def done(result):
            if isinstance(result, Failure):
                self.log.error("queue scan failed: {why}", why=result.getErrorMessage())
            self._scan_done()

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
        self._fill()

    def _pickup(self, qid: int, when: float | None = None) -> None:
        """Read msg `qid` into the window; `when`: its next try as the backlog knew it."""
        if qid in self.jobs or qid in self.picking:
            self._clash(qid, None)
            return
        self.picking.add(qid)
        d = self._defer(self._read, qid)
        d.addCallbacks(self._picked, self._pick_failed, callbackArgs=(when,),
                       errbackArgs=(qid,))
        d.addErrback(self._bug, "pick-up of msg %d" % qid)

    def _pickup_many(self, entries) -> None:
        """Read backlog entries into the window, several per thread call."""
        todo = []
        for e in entries:
            if e.qid in self.jobs or e.qid in self.picking:
                self._clash(e.qid, None)
            else:
                self.picking.add(e.qid)
                todo.append(e)
        if not todo:
            return

        def got(results):
            for e, r in zip(todo, results):
                if isinstance(r, Failure):
                    self._pick_failed(r, e.qid)
                else:
                    self._picked(r, e.next_try)

        d = self._defer(self._read_many, [e.qid for e in todo])
        d.addCallback(got)
        d.addErrback(self._bug, "pick-up of %d messages" % len(todo))

    def _read_many(self, qids: list[int]) -> list:
        out = []
        for qid in qids:
            try:
                out.append(self._read(qid))
            except Exception:  # noqa: BLE001 - each one's failure is handled on its own
                out.append(Failure())
        return out

    def _read(self, qid: int):
        env = self.store.read_envelope(qid)
        return env, self._channels(env), self.store.next_try(qid)

    def _channels(self, env: Envelope) -> dict[int, str]:
        """Recipient index -> LOCAL or REMOTE, for the recipients still to do."""
        return {r.index: self.classify(r.address) for r in env.recipients if r.state == TODO}

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
            self._fill()
            return
        self.log.error("trouble reading msg {qid}: {why}; will try again",
                       qid=qid, why=f.getErrorMessage())
        self.reactor.callLater(PICKUP_RETRY, self.notify, qid)
        self._fill()

    def _picked(self, result, when: float | None) -> None:
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
        now = self.now()
        if when is None or mtime < env.birth + schedule.CHANSKIP[LOCAL] ** 2:
            # A new message: committed just now, or never deferred (mtime = commit time)
            # when it comes from the backlog (qmail-send logs "new msg" once a message).
            self.stats["messages_seen"] += 1
            if env.received_from:
                self.log.info("new msg {qid}: {trace}", qid=_name(env),
                              trace=logsafe_address(env.received_from))
            else:
                self.log.info("new msg {qid}", qid=_name(env))
            self.log.info("info msg {qid}: bytes {size} from <{sender}> qp {qp} uid {uid}",
                          qid=_name(env), size=env.size, sender=logsafe_address(env.sender),
                          qp=env.qp, uid=env.uid)
        start = self._start_time(mtime, env.birth, now) if when is None else max(when, now)
        for ch in (LOCAL, REMOTE):
            if job.todo(ch):
                self._schedule(job, ch, start)
        if not job.pending():
            self._finish(job)
        self._maybe_evict(job)
        self._pump()

    # -- scheduling ---------------------------------------------------------------------------------
    def _schedule(self, job: Job, channel: str, when: float) -> None:
        job.next_try[channel] = when
        if when <= self.now():
            self._make_ready(job.qid, channel)
        else:
            heapq.heappush(self._wakeups, (when, next(self._wakeup_seq), job.qid, channel))
            if len(self._wakeups) > 2 * len(self.jobs) + WAKEUPS_SLACK:
                self._compact_wakeups()
            self._arm()

    def _compact_wakeups(self) -> None:
        """Drop the timers of messages that left the window (or were scheduled again): the
        heap stays proportional to the window, not to the queue."""
        live = []
        for entry in self._wakeups:
            job = self.jobs.get(entry[2])
            if job is not None and job.next_try.get(entry[3]) == entry[0]:
                live.append(entry)
        heapq.heapify(live)
        self._wakeups = live

    def _make_ready(self, qid: int, channel: str) -> None:
        if channel == LOCAL:
            if qid not in self._in_ready:
                self._in_ready.add(qid)
                self.ready.append(qid)
            return
        job = self.jobs.get(qid)
        if job is None:
            return
        for name in self._remote_units(job):
            dest = self._dest(name)
            if qid not in dest.queued:
                dest.queued.add(qid)
                dest.ready.append(qid)
            self._take_turn(name)

    def _dest(self, name: str) -> Destination:
        dest = self.dests.get(name)
        if dest is None:
            dest = self.dests[name] = Destination(name)
        return dest

    def _take_turn(self, name: str) -> None:
        if name not in self._in_turn:
            self._in_turn.add(name)
            self._turn.append(name)

    def _remote_units(self, job: Job, only: str | None = None) -> dict[str, list[list[int]]]:
        """destination -> its transactions: the remote recipients to do, by domain, at most
        REMOTE_MAX_RCPTS each."""
        by_domain: dict[str, list[int]] = {}
        for i in job.todo(REMOTE):
            by_domain.setdefault(_domain(job.env.recipients[i].address), []).append(i)
        out: dict[str, list[list[int]]] = {}
        for domain, indices in by_domain.items():
            name = self.destination_of(domain)
            if only is not None and name != only:
                continue
            units = out.setdefault(name, [])
            for k in range(0, len(indices), REMOTE_MAX_RCPTS):
                units.append(indices[k:k + REMOTE_MAX_RCPTS])
        return out

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

    def flush(self, qid: int | None = None, domain: str | None = None):
        """Retry deferred recipients now (mailappliance queue flush): all, those of message
        `qid`, or those at `domain` (a dead destination is tried again too); -> messages, or
        a Deferred of it when messages of the backlog must be read to know their domains."""
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
        if qid is not None:
            if not jobs and qid not in self.picking:
                self.backlog.remove(qid)
                self._pickup(qid, now)
                n += 1
            self._pump()
            return n
        if domain is None:
            n += len(self.backlog)
            for dest in list(self.dests.values()):
                self._revive(dest, flushed=True)
            self.backlog.release_all(now)
            self.scan_soon()
            self._fill()
            self._pump()
            return n
        name = self.destination_of(domain)
        dest_id = self.backlog.known_dest(name)
        if dest_id is not None:
            n += self.backlog.release(dest_id, now)
        if name in self.dests:
            self._revive(self.dests[name], flushed=True)
        unknown = self.backlog.take_unknown()
        self._fill()
        self._pump()
        if not unknown:
            return n
        d = self._defer(self._sort_unknown, unknown, domain)

        def sorted_out(matched):
            for e, hit in zip(unknown, matched):
                if hit:
                    self.backlog.add_due(e.qid, now, e.birth, e.dest)
                else:
                    self.backlog.add(e.qid, e.next_try, e.birth, e.dest, now)
            self._fill()
            self._pump()
            return n + sum(matched)
        return d.addCallback(sorted_out)

    def _sort_unknown(self, entries, domain: str) -> list[bool]:
        """In a thread: which of these messages have a recipient to do at `domain`."""
        out = []
        for e in entries:
            try:
                env = self.store.read_envelope(e.qid)
            except (OSError, CorruptEntry):
                out.append(True)        # let the pick-up sort it out
                continue
            out.append(any(r.state == TODO and _domain(r.address) == domain
                           for r in env.recipients))
        return out

    def _pump(self) -> None:
        if not self.running:
            return
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                self._pump_local()
                self._pump_remote()
                if not self._pump_again:
                    break
        finally:
            self._pumping = False

    def _pump_local(self) -> None:
        ready = self.ready
        while self.busy[LOCAL] < self.limit[LOCAL] and ready:
            qid = ready[0]
            job = self.jobs.get(qid)
            todo = job.todo(LOCAL) if job is not None and not job.finishing else []
            if not todo:
                ready.popleft()
                self._in_ready.discard(qid)
                continue
            if len(todo) == 1:
                ready.popleft()
                self._in_ready.discard(qid)
            self._start(job, LOCAL, todo[:1])
        if self.busy[LOCAL] >= self.limit[LOCAL]:
            # Every local slot is taken: no further delivery can join the ones waiting in
            # the local deliverer's gathering window, so they need not wait for its end.
            self.local.flush()

    def _pump_remote(self) -> None:
        """Round robin over the destinations with work: one transaction each per turn."""
        now = self.now()
        turn = self._turn
        while turn and self.busy[REMOTE] < self.limit[REMOTE]:
            name = turn.popleft()
            self._in_turn.discard(name)
            dest = self.dests.get(name)
            if dest is None:
                continue
            if not dest.ready:
                self._drop_if_idle(dest)
                continue
            if dest.dead_until > now:
                self._suspend(dest)
                continue
            if dest.busy >= (1 if dest.probing else self.dest_limit):
                continue                # back in turn when one of its deliveries ends
            qid = dest.ready[0]
            job = self.jobs.get(qid)
            units = self._remote_units(job, name).get(name, []) \
                if job is not None and not job.finishing else []
            if len(units) <= 1:
                dest.ready.popleft()
                dest.queued.discard(qid)
            if units:
                self._start(job, REMOTE, units[0], name)
            if dest.ready:
                self._take_turn(name)

    def _drop_if_idle(self, dest: Destination) -> None:
        if not dest.busy and not dest.ready and not dest.backoff:
            self.dests.pop(dest.name, None)

    def _suspend(self, dest: Destination) -> None:
        """A dead destination's waiting messages: deferred now, without a connection each."""
        now = self.now()
        text = TEXT_SUSPENDED.format(dest=dest.name, ago=int(now - dest.dead_since),
                                     left=int(dest.dead_until - now))
        text += "\n" + dest.reason
        waiting = list(dest.ready)
        dest.ready.clear()
        dest.queued.clear()
        for qid in waiting:
            job = self.jobs.get(qid)
            if job is None or job.finishing:
                continue
            for unit in self._remote_units(job, dest.name).get(dest.name, []):
                self.stats["suspended"] += 1
                self._start(job, REMOTE, unit, dest.name, [deferral(text)] * len(unit))

    def _start(self, job: Job, channel: str, unit: list[int], dest: str | None = None,
               suspended: list[Result] | None = None) -> None:
        env = job.env
        job.busy.update(unit)
        self.busy[channel] += 1
        if dest is not None and suspended is None:
            self._dest(dest).busy += 1
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
        if suspended is not None:
            d = defer.succeed(suspended)
        elif channel == LOCAL:
            d = defer.maybeDeferred(self.local.deliver, env, unit[0], self.store)
            d.addCallback(lambda r: [r])
        else:
            d = defer.maybeDeferred(self.remote.deliver, env, unit, self.store)
        d.addBoth(self._attempt_done, job, channel, unit, dnos, started,
                  None if suspended is not None else dest)
        d.addErrback(self._bug, "completion of msg %d" % env.qid)

    # -- destinations ------------------------------------------------------------------------------
    def _destination_result(self, name: str, results: list[Result]) -> None:
        """An attempt at destination `name` ended: free its slot, and learn from the results
        whether it is dead (nothing reached) or alive."""
        dest = self._dest(name)
        dest.busy -= 1
        if results and all(r.status == DEFERRAL and self.destination_down(r) for r in results):
            self._kill(dest, results[0].text)
        else:
            self._revive(dest)
        if dest.ready:
            self._take_turn(name)
        else:
            self._drop_if_idle(dest)

    def _kill(self, dest: Destination, text: str) -> None:
        now = self.now()
        if dest.dead_until > now:
            return                      # another attempt in flight already found it dead
        dest.backoff = DEAD_RETRY_MIN if not dest.backoff else \
            min(dest.backoff * 2, DEAD_RETRY_MAX)
        if not dest.dead_since:
            dest.dead_since = now
            self.stats["dead_destinations"] += 1
        dest.dead_until = now + dest.backoff
        dest.reason = text
        waiting = self.backlog.count_dest(self.backlog.dest_id(dest.name)) + len(dest.ready)
        self.log.warn("destination {dest} is dead: {why}; its messages ({n} waiting) are "
                      "deferred without trying until {s} s from now",
                      dest=dest.name, why=logsafe(text), n=waiting, s=int(dest.backoff))
        if dest.timer is not None and dest.timer.active():
            dest.timer.cancel()
        dest.timer = self.reactor.callLater(dest.backoff, self._probe, dest.name)
        if dest.ready:
            self._take_turn(dest.name)

    def _probe(self, name: str) -> None:
        """A dead destination's time is up: one message tries it (its messages in the window
        first, else one from the backlog)."""
        dest = self.dests.get(name)
        if dest is None or not self.running:
            return
        dest.timer = None
        if dest.ready:
            self._take_turn(name)
        else:
            dest_id = self.backlog.known_dest(name)
            entry = self.backlog.probe(dest_id) if dest_id is not None else None
            if entry is not None:
                self._pickup(entry.qid, self.now())
            elif not dest.busy:
                # Nothing waits for it: forget it (the next message finds out afresh).
                self.dests.pop(name, None)
        self._pump()

    def _revive(self, dest: Destination, flushed: bool = False) -> None:
        """Something reached `dest` (or an operator flushed it): alive; everything waiting
        for it is due at once."""
        if not dest.backoff:
            return
        now = self.now()
        if dest.timer is not None and dest.timer.active():
            dest.timer.cancel()
        dest.timer = None
        dest_id = self.backlog.known_dest(dest.name)
        n = self.backlog.release(dest_id, now) if dest_id is not None else 0
        self.log.info("destination {dest} is {how} after {s} s; {n} waiting messages are "
                      "due now", dest=dest.name, s=int(now - dest.dead_since), n=n,
                      how="flushed" if flushed else "alive again")
        dest.backoff = dest.dead_until = dest.dead_since = 0.0
        dest.reason = ""
        if dest.ready:
            self._take_turn(dest.name)
        self._fill()

    # -- results --------------------------------------------------------------------------------------
    def _attempt_done(self, results, job: Job, channel: str, unit: list[int], dnos: list[int],
                      started: float, dest: str | None = None):
        if isinstance(results, Failure):
            self.log.failure("delivery of msg {qid} raised", results, qid=_name(job.env))
            results = [deferral(TEXT_INTERNAL)] * len(unit)
        if len(results) != len(unit):
            self.log.error("deliverer returned {n} results for {m} recipients",
                           n=len(results), m=len(unit))
            results = [deferral(TEXT_INTERNAL)] * len(unit)
        if dest is not None:
            self._destination_result(dest, results)
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
            d = self._remove_soon(env.qid, env.bounce_file, env.size)
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

    def _remove_soon(self, qid: int, bounce_file: bool = True,
                     size: int | None = None) -> defer.Deferred:
        """Remove a finished message; removals that pile up while one batch is being removed
        go together in the next (one thread hand-off for many messages under load). With its
        size the store may keep its file for reuse (QueueStore.remove_many)."""
        return self._remover.submit((qid, bounce_file, size))

    def _remove_many(self, items: list[tuple]) -> list[None]:
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
        self._maybe_evict(job)
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
            # Read and composed in the pool: up to BOUNCE_MAX_COPY of the original, whose long
            # lines are re-encoded (reencode.py), is too much work for the reactor thread.
            text = yield self._defer(self._bounce_text, env, b_rcpt, self.now(), self.hostname)
        except Exception as e:  # noqa: BLE001
            self.log.error("cannot read msg {qid} to bounce it: {why}", qid=_name(env), why=str(e))
            return False
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

    def _bounce_text(self, env: Envelope, recipient: str, now: float, hostname: str) -> bytes:
        """The bounce of env's failures to `recipient` (pool thread)."""
        failures, (data, truncated) = self._bounce_material(env)
        return bounce_mod.bounce_message(
            hostname=hostname, sender=env.sender, recipient=recipient, failures=failures,
            original=data, truncated=truncated, now=now,
            message_id="%d.%d.bounce" % (int(now), env.qid), arrival=env.birth)

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
        """Arrival time of the oldest message in the queue (metrics' queue age): the window's
        and the backlog's (while the queue is still loading: of those loaded so far)."""
        births = [job.env.birth for job in self.jobs.values()]
        oldest = self.backlog.oldest_birth()
        if oldest is not None:
            births.append(oldest)
        return min(births, default=None)

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
            if qid in self.jobs or qid in self.picking:
                return False
            self.backlog.remove(qid)
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
