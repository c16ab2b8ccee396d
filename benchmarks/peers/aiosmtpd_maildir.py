"""The "typical Python" SMTP peer: aiosmtpd 1.4.6 with a Maildir handler that fsyncs.

The handler does what a careful small aiosmtpd deployment does (and what mailappliance promises):
each message goes to ``tmp/``, the file is fsynced, renamed into ``new/``, and ``new/`` is
fsynced, all before the 250 is sent.  By default the handler does this inline in the event loop,
as aiosmtpd's own ``aiosmtpd.handlers.Mailbox`` handler writes synchronously; ``--executor N``
moves the file work to a pool of N threads instead (a more tuned variant, reported separately).

    python benchmarks/peers/aiosmtpd_maildir.py --maildir DIR --ready FILE [--port 0]
        [--executor N]

Listens on 127.0.0.1 only.  Once bound it writes ``{"pid": ..., "port": ...}`` to FILE.  Stops on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from aiosmtpd.smtp import SMTP

HOST = "127.0.0.1"
HOSTNAME = "aiosmtpd.bench.test"
# aiosmtpd's own default DATA limit (aiosmtpd.smtp.DATA_SIZE_DEFAULT, 32 MiB).
DATA_SIZE_LIMIT = 33554432


class MaildirHandler:
    def __init__(self, maildir: str, executor: ThreadPoolExecutor | None) -> None:
        self.maildir = maildir
        self.tmp = os.path.join(maildir, "tmp")
        self.new = os.path.join(maildir, "new")
        for d in (self.tmp, self.new, os.path.join(maildir, "cur")):
            os.makedirs(d, exist_ok=True)
        self.executor = executor
        self.seq = itertools.count()
        self.host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self.pid = os.getpid()

    def deliver(self, envelope) -> None:
        """Maildir protocol: unique name in tmp/, write, fsync, rename to new/, fsync new/."""
        now = time.time()
        name = f"{int(now)}.M{int(now * 1e6) % 1000000}P{self.pid}Q{next(self.seq)}.{self.host}"
        tmp_path = os.path.join(self.tmp, name)
        rcpts = ", ".join(envelope.rcpt_tos)
        head = (f"Return-Path: <{envelope.mail_from}>\r\nDelivered-To: {rcpts}\r\n").encode()
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = head + envelope.original_content
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, os.path.join(self.new, name))
        dfd = os.open(self.new, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def handle_DATA(self, server, session, envelope) -> str:
        try:
            if self.executor is None:
                self.deliver(envelope)
            else:
                await asyncio.get_running_loop().run_in_executor(self.executor, self.deliver,
                                                                 envelope)
        except OSError:
            return "451 4.3.0 write error"
        return "250 2.0.0 OK"


async def serve(args) -> None:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(args.executor) if args.executor else None
    handler = MaildirHandler(args.maildir, executor)

    def factory():
        return SMTP(handler, hostname=HOSTNAME, data_size_limit=DATA_SIZE_LIMIT,
                    enable_SMTPUTF8=False, decode_data=False, loop=loop)

    server = await loop.create_server(factory, host=HOST, port=args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "port": port}, f)
    os.replace(tmp, args.ready)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()
    if executor is not None:
        executor.shutdown(wait=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maildir", required=True)
    ap.add_argument("--ready", required=True, help="JSON file written once listening")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--executor", type=int, default=0,
                    help="threads for the Maildir writes (0 = inline in the event loop)")
    asyncio.run(serve(ap.parse_args()))


if __name__ == "__main__":
    main()
