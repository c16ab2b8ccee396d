"""The queue's backlog: what the queue manager knows of the messages it does not hold in memory.

The manager works on an active window of at most ``active_limit`` messages (Postfix's active
queue, qmgr_message_active_limit); every other message of the queue directory is one entry
here, four numbers in four arrays (24 bytes a message, so a backlog of a million costs 24 MB,
where a message in the window costs a few KB):

* its queue id (the file mess/<id>);
* its next try (the mtime of its file, store.py);
* its birth (for the age of the oldest message, and a last attempt at the end of its life);
* the number of its destination (`dest_id`: the one remote domain or route host its
  remaining recipients wait for, or `UNKNOWN` when there are several, or local ones), so a
  destination that comes back to life releases its backlog at once (`release`) and
  ``queue flush @domain`` finds its messages without reading every file.

Entries due later sit in buckets of `BUCKET_SECONDS` (a heap of bucket start times), entries
due now in a first-in first-out list; `take` hands out due entries in that order.  A bucket is
handed out when it starts, up to a bucket's width before its entries are due: the manager
reads them and waits for each one's exact time in memory.

A pure core: no clock reads (time comes in as arguments), no I/O, stdlib only.
"""

from __future__ import annotations

import heapq
from array import array
from itertools import islice
from typing import NamedTuple

# Width of a bucket of future entries.  Retries are minutes to days apart (schedule.py:
# 100 s, 400 s, 900 s ... for local, 400 s, 1600 s ... for remote), so a minute keeps the
# buckets few (a week of them: 10,080, about 1 MB of bookkeeping) and hands an entry to the
# manager at most a minute before its time.
BUCKET_SECONDS = 60.0
# The first-in first-out list of due entries drops its consumed head once that is at least
# this long and half the list (an amortised O(1) pop from the front of an array).
COMPACT_MIN = 4096
# Destination numbers: UNKNOWN is "not one remote destination" (or not known yet).
UNKNOWN = 0


class Entry(NamedTuple):
    qid: int
    next_try: float
    birth: float
    dest: int


class _Block:
    """Entries in four parallel arrays, and where the oldest birth is (`_oldest_at`: its
    index, or None when not known), so the queue's age (`stat`, every metrics scrape) costs
    a pass over a block only after an entry that may have been the oldest left it -- not
    18 ms per million entries each time."""

    __slots__ = ("qids", "times", "births", "dests", "_oldest_at")

    def __init__(self) -> None:
        self.qids = array("q")
        self.times = array("d")
        self.births = array("d")
        self.dests = array("I")
        self._oldest_at: int | None = None

    def append(self, qid: int, next_try: float, birth: float, dest: int) -> None:
        n = len(self.qids)
        at = self._oldest_at
        if n == 0:
            self._oldest_at = 0
        elif at is not None and birth < self.births[at]:
            self._oldest_at = n
        self.qids.append(qid)
        self.times.append(next_try)
        self.births.append(birth)
        self.dests.append(dest)

    def extend(self, other: "_Block", start: int = 0) -> None:
        self.qids.extend(other.qids[start:])
        self.times.extend(other.times[start:])
        self.births.extend(other.births[start:])
        self.dests.extend(other.dests[start:])
        self._oldest_at = None

    def entry(self, i: int) -> Entry:
        return Entry(self.qids[i], self.times[i], self.births[i], self.dests[i])

    def drop(self, i: int) -> None:
        """Remove entry i by moving the last one into its place (order is not kept)."""
        at, last = self._oldest_at, len(self.qids) - 1
        self._oldest_at = None if at == i else (i if at == last else at)
        for a in (self.qids, self.times, self.births, self.dests):
            a[i] = a[-1]
            a.pop()

    def delete(self, i: int) -> None:
        """Remove entry i, keeping the order of the others."""
        at = self._oldest_at
        self._oldest_at = None if at is None or at == i else (at - 1 if at > i else at)
        for a in (self.qids, self.times, self.births, self.dests):
            del a[i]

    def split(self, keep) -> "_Block":
        """Remove the entries whose destination `keep` refuses; return them as a block."""
        out, rest = _Block(), _Block()
        for i in range(len(self.qids)):
            (rest if keep(self.dests[i]) else out).append(
                self.qids[i], self.times[i], self.births[i], self.dests[i])
        self.qids, self.times, self.births, self.dests = \
            rest.qids, rest.times, rest.births, rest.dests
        self._oldest_at = rest._oldest_at
        return out

    def oldest(self, start: int = 0) -> float | None:
        """The oldest birth among entries `start`.. (the due list's consumed head is skipped:
        taking from the head keeps the known index while it is not passed)."""
        births = self.births
        if start >= len(births):
            return None
        at = self._oldest_at
        if at is None or at < start:
            part = births[start:] if start else births
            at = self._oldest_at = start + part.index(min(part))
        return births[at]

    def __len__(self) -> int:
        return len(self.qids)


class Backlog:
    """Messages outside the active window: due ones first in, first out; later ones by time."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Block] = {}
        self._keys: list[int] = []              # heap of the buckets' numbers
        self._due = _Block()
        self._head = 0                          # the due list's consumed entries
        self._count = 0
        self._dest_ids: dict[str, int] = {}
        self._dest_names: list[str] = [""]

    # -- destinations ---------------------------------------------------------------------------
    def dest_id(self, name: str | None) -> int:
        """The number of destination `name` (None: UNKNOWN)."""
        if not name:
            return UNKNOWN
        n = self._dest_ids.get(name)
        if n is None:
            n = self._dest_ids[name] = len(self._dest_names)
            self._dest_names.append(name)
        return n

    def known_dest(self, name: str) -> int | None:
        return self._dest_ids.get(name)

    def dest_name(self, n: int) -> str | None:
        return self._dest_names[n] if n else None

    # -- adding ---------------------------------------------------------------------------------
    def add(self, qid: int, next_try: float, birth: float, dest: int = UNKNOWN,
            now: float | None = None) -> None:
        """A message to try at `next_try` (at once when that is not after `now`)."""
        if now is not None and next_try <= now:
            self.add_due(qid, next_try, birth, dest)
            return
        key = int(next_try // BUCKET_SECONDS)
        block = self._buckets.get(key)
        if block is None:
            block = self._buckets[key] = _Block()
            heapq.heappush(self._keys, key)
        block.append(qid, next_try, birth, dest)
        self._count += 1

    def add_due(self, qid: int, next_try: float, birth: float, dest: int = UNKNOWN) -> None:
        """A message to try as soon as the window has room, after those already due."""
        self._due.append(qid, next_try, birth, dest)
        self._count += 1

    # -- taking ---------------------------------------------------------------------------------
    def next_time(self) -> float | None:
        """When the next bucket starts (None: no entry waits for a time)."""
        return self._keys[0] * BUCKET_SECONDS if self._keys else None

    def has_due(self, now: float) -> bool:
        return self._head < len(self._due) or (
            bool(self._keys) and self._keys[0] * BUCKET_SECONDS <= now)

    def take(self, now: float, n: int) -> list[Entry]:
        """Up to `n` entries due at `now`: the due list first, then buckets that have begun."""
        out: list[Entry] = []
        while len(out) < n:
            if self._head >= len(self._due):
                if not self._keys or self._keys[0] * BUCKET_SECONDS > now:
                    break
                self._open(heapq.heappop(self._keys))
                continue
            end = min(len(self._due), self._head + n - len(out))
            out.extend(self._due.entry(i) for i in range(self._head, end))
            self._head = end
        self._count -= len(out)
        self._compact()
        return out

    def _open(self, key: int) -> None:
        block = self._buckets.pop(key)
        if self._head >= len(self._due):
            self._due, self._head = block, 0     # the common case: no copy
        else:
            self._due.extend(block)

    def _compact(self) -> None:
        if self._head >= len(self._due):
            self._due, self._head = _Block(), 0
        elif self._head >= COMPACT_MIN and self._head * 2 >= len(self._due):
            rest = _Block()
            rest.extend(self._due, self._head)
            self._due, self._head = rest, 0

    # -- moving to due --------------------------------------------------------------------------
    def release(self, dest: int, now: float) -> int:
        """Every waiting entry of destination `dest` becomes due at `now` (it came back to
        life, or an operator flushed it); -> how many."""
        if dest == UNKNOWN:
            return 0
        moved = 0
        for key in list(self._buckets):
            block = self._buckets[key]
            n = block.dests.count(dest)
            if not n:
                continue
            if n == len(block):                 # a bucket of that destination alone
                del self._buckets[key]
            else:
                block = block.split(lambda d: d != dest)
            self._make_due(block, now)
            moved += n
        if moved:
            self._rebuild_keys()
        return moved

    def release_all(self, now: float) -> int:
        """Every entry becomes due at `now` (`queue flush`); -> how many were waiting."""
        moved = 0
        for key in sorted(self._buckets):
            block = self._buckets[key]
            moved += len(block)
            self._make_due(block, now)
        self._buckets.clear()
        self._keys.clear()
        return moved

    def take_unknown(self) -> list[Entry]:
        """Take the waiting entries whose destination is UNKNOWN (`queue flush @domain` reads
        them to see which have recipients at the domain, and adds them back)."""
        out: list[Entry] = []
        for key in list(self._buckets):
            block = self._buckets[key]
            if UNKNOWN not in block.dests:
                continue
            taken = block.split(lambda d: d != UNKNOWN)
            out.extend(taken.entry(i) for i in range(len(taken)))
            if not len(block):
                del self._buckets[key]
        self._count -= len(out)
        self._rebuild_keys()
        return out

    def _make_due(self, block: _Block, now: float) -> None:
        """A block taken out of its bucket joins the due list, every entry due at `now`."""
        block.times = array("d", [now]) * len(block)
        self._due.extend(block)

    def _rebuild_keys(self) -> None:
        self._keys = list(self._buckets)
        heapq.heapify(self._keys)

    def probe(self, dest: int) -> Entry | None:
        """Take one waiting entry of `dest` (the one that tells whether it is back)."""
        for key in sorted(self._buckets):
            block = self._buckets[key]
            try:
                i = block.dests.index(dest)
            except ValueError:
                continue
            entry = block.entry(i)
            self._drop(key, block, i)
            return entry
        return None

    def _drop(self, key, block, i: int) -> None:
        """Take entry `i` out of the bucket `key` (the bucket goes when it is empty)."""
        block.drop(i)
        if not len(block):
            del self._buckets[key]
            self._keys.remove(key)
            heapq.heapify(self._keys)
        self._count -= 1

    # -- admin ----------------------------------------------------------------------------------
    def remove(self, qid: int) -> bool:
        """Forget `qid` (removed by an operator) -> whether it was here."""
        try:
            i = self._due.qids.index(qid, self._head)     # at C speed, not a Python loop
        except ValueError:
            pass
        else:
            self._due.delete(i)
            self._count -= 1
            return True
        for key, block in list(self._buckets.items()):
            try:
                i = block.qids.index(qid)
            except ValueError:
                continue
            self._drop(key, block, i)
            return True
        return False

    def known(self, qids: set[int]) -> set[int]:
        """Those of `qids` that have an entry (one pass over the arrays, at C speed)."""
        hits: set[int] = set()
        if qids:
            for b in self._buckets.values():
                hits |= qids.intersection(b.qids)
            hits |= qids.intersection(islice(self._due.qids, self._head, None))
        return hits

    def count_dest(self, dest: int) -> int:
        due = self._due.dests
        return (sum(b.dests.count(dest) for b in self._buckets.values())
                + due.count(dest) - due[:self._head].count(dest))

    def oldest_birth(self) -> float | None:
        births = [b.oldest() for b in self._buckets.values() if len(b)]
        due = self._due.oldest(self._head)
        if due is not None:
            births.append(due)
        return min(births, default=None)

    def due_count(self) -> int:
        return len(self._due) - self._head

    def __len__(self) -> int:
        return self._count

    def memory(self) -> int:
        """Bytes held in the arrays (about 24 an entry, plus unused capacity)."""
        return sum(a.itemsize * a.buffer_info()[1]
                   for b in (*self._buckets.values(), self._due)
                   for a in (b.qids, b.times, b.births, b.dests))
