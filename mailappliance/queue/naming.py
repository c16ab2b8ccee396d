"""Names in the queue directory: where it is, its subdirectories, and new tmp/ file names.

Layout under ``<data>/queue`` (queue/store.py, its only writer, describes each part)::

    tmp/<k>/<time>.<pid>.<seq>.<rand>   an injection in progress; k is the writer thread's shard
    mess/<N>                           a committed message; N is its inode number
    bounce/<N>                         failure reports of message N
    defer/<N>                          per recipient: attempts, last try and last deferral text
    free/<N>                           a finished message's file kept for reuse (the server's)
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
import zlib

from mailappliance.fileops import process_id

TMP, MESS, BOUNCE, CORRUPT = "tmp", "mess", "bounce", "corrupt"
DEFER = "defer"
FREE = "free"
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


def message_name(qid: int, token: str) -> str:
    """The id the log and the SMTP ``250 ok`` show: ``<inode>.<8 hex digits>``.

    An inode number is reused as soon as a finished message's file is gone, so the number
    alone would name several messages in one log; the hex part is the CRC-32 of the message's
    token (its tmp/ name: time, pid, sequence, random bits), which tells two messages with the
    same inode apart. The admin commands take either form; the long one never names a later
    message that reused the number."""
    return "%d.%08x" % (qid, zlib.crc32(token.encode("utf-8", "surrogateescape")))


def parse_message_name(text: str) -> tuple[int, str | None]:
    """``N`` or ``N.hhhhhhhh`` -> (N, the hex part or None); ValueError otherwise."""
    number, dot, check = text.partition(".")
    if not number.isdigit() or len(number) > 20 or (dot and (
            len(check) != 8 or any(c not in "0123456789abcdef" for c in check))):
        raise ValueError("a queue id is a number, or number.hex as the log shows it")
    return int(number), (check if dot else None)


def tmp_shard() -> int:
    """This thread's tmp/ subdirectory number (0 <= k < TMP_SPLIT), fixed per thread."""
    shard = getattr(_thread_shard, "k", None)
    if shard is None:
        shard = _thread_shard.k = next(_shard_counter) % TMP_SPLIT
    return shard


def tmp_name(now: float) -> str:
    """A new tmp/ file name: <time>.<pid>.<seq>.<random>."""
    return "%d.%d.%d.%08x" % (int(now), process_id(), next(_seq), token_bits())
