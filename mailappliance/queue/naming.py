"""Names in the queue directory: where it is, its subdirectories, and new tmp/ file names.

Layout under ``<data>/queue`` (queue/store.py, its only writer, describes each part)::

    tmp/<k>/<time>.<pid>.<seq>.<rand>   an injection in progress; k is the writer thread's shard
    mess/<N>                           a committed message; N is its inode number
    bounce/<N>                         failure reports of message N
    corrupt/<N>.<time>                 entries that could not be parsed, moved aside
    trigger                            unix datagram socket of the running manager

Queue ids need no generator: a message's id is its file's inode number, like qmail's, unique
across processes for free.  A tmp/ name only has to be unique among injections in progress
(O_EXCL makes sure) and the token only tells a message from an earlier one with the same
inode, so neither needs secret randomness.

No Twisted, nothing of ours but fileops' process id: the sendmail command and the store
commands import this without the server.
"""

from __future__ import annotations

import itertools
import os
import random
import threading

from mailappliance.fileops import process_id

TMP, MESS, BOUNCE, CORRUPT = "tmp", "mess", "bounce", "corrupt"
TRIGGER = "trigger"
# tmp/ subdirectories, one per concurrent writer thread (more than the thread pool's size):
# concurrent creates and fsyncs in one directory contend (measured here: 8 writers reach
# ~2,000 commits/s in one tmp/ and ~3,300 in separate ones).
TMP_SPLIT = 16


def queue_dir(settings):
    """The queue directory of an instance: ``<data>/queue``."""
    return settings.data / "queue"


_seq = itertools.count(1)
_shard_counter = itertools.count()
_thread_shard = threading.local()

# Read once per process: each of these is a system call, and in a pool thread every system
# call is a GIL hand-over (costly on this kind of VM). The uid is read at the first injection,
# after twistd has dropped privileges; a forked child starts afresh.
_ids: dict[str, object] = {}


def uid() -> int:
    """os.getuid(), read once per process (the envelope's uid field)."""
    u = _ids.get("uid")
    if u is None:
        u = _ids["uid"] = os.getuid()
    return u


def token_bits() -> int:
    """32 random bits for tmp/ names and message tokens: unique, not secret (O_EXCL and the
    pid make names unique; the token only tells a message from an earlier one with the same
    inode), so a generator seeded from the kernel once per process does."""
    rng = _ids.get("rng")
    if rng is None:
        rng = _ids["rng"] = random.Random(os.urandom(16))
    return rng.getrandbits(32)


os.register_at_fork(after_in_child=_ids.clear)


def tmp_shard() -> int:
    """This thread's tmp/ subdirectory number (0 <= k < TMP_SPLIT), fixed per thread."""
    shard = getattr(_thread_shard, "k", None)
    if shard is None:
        shard = _thread_shard.k = next(_shard_counter) % TMP_SPLIT
    return shard


def tmp_name(now: float) -> str:
    """A new tmp/ file name: <time>.<pid>.<seq>.<random>."""
    return "%d.%d.%d.%08x" % (int(now), process_id(), next(_seq), token_bits())
