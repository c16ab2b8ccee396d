"""A private Postfix instance for the end-to-end benchmark: virtual Maildir domain on loopback.

Never touches the system instance: everything (config, queue, data, log, mailboxes) lives in
one scratch folder and Postfix is started with ``postfix -c <scratch>/etc start``.  The
master.cf has the smtpd on a private 127.0.0.1 port and only the services virtual delivery
needs; there is no smtp or lmtp client service and every non-virtual transport is ``error:``,
so nothing can leave the machine (see benchmarks/README.md).

    inst = PostfixInstance(Path("/var/tmp/x"), port)
    inst.setup(); inst.start(); ... inst.maildir ... ; inst.stop()

Run directly for a smoke test: ``python benchmarks/peers/postfix.py /var/tmp/pf-smoke``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"
# The uid/gid virtual(8) delivers as (static:65534, i.e. nobody/nogroup).
VIRTUAL_UID = 65534
VIRTUAL_GID = 65534
# Upper bounds for `postfix start` to accept connections and `postfix stop` to finish;
# start-up takes well under a second here, the rest is slack for a loaded machine.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
DOMAIN = "test.com"
USER = "test"

MAIN_CF = """\
# Private benchmark instance written by benchmarks/peers/postfix.py; not the system Postfix.
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {queue}
data_directory = {data}
daemon_directory = {daemon_directory}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = reject_unauth_destination
smtputf8_enable = no
biff = no
# Nothing may leave the machine: every transport other than virtual is an error.
default_transport = error:benchmark instance delivers nothing remotely
relay_transport = error:benchmark instance delivers nothing remotely
local_transport = error:benchmark instance has no local delivery
local_recipient_maps =
# Virtual Maildir domain (trailing slash in the map value = Maildir).
virtual_mailbox_domains = {domain}
virtual_mailbox_maps = inline:{{ {user}@{domain}={domain}/{user}/ }}
virtual_mailbox_base = {mailboxes}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = {uid}
message_size_limit = 20480000
# Logging without syslog: a file under a listed prefix plus the postlog service.
maillog_file = {log}
maillog_file_prefixes = {root}
"""

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n   -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    pass


class PostfixInstance:
    """One private Postfix: config in root/etc, queue in root/spool, Maildir in root/vmail."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = Path(root).resolve()
        self.port = port
        self.etc = self.root / "etc"
        self.queue = self.root / "spool"
        self.data = self.root / "lib"
        self.mailboxes = self.root / "vmail"
        self.log = self.root / "maillog"
        self.maildir = self.mailboxes / DOMAIN / USER
        self.started = False

    def setup(self) -> None:
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance needs root (it runs as user postfix)")
        for d in (self.etc, self.queue, self.data, self.mailboxes):
            d.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        # Postfix daemons run as user postfix: every ancestor must be searchable by others.
        for parent in self.root.parents:
            if not parent.stat().st_mode & 0o001:
                raise PostfixError(f"{parent} is not searchable by user postfix (chmod o+x)")
        pf = pwd.getpwnam("postfix")
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        (self.etc / "main.cf").write_text(MAIN_CF.format(
            etc=self.etc, queue=self.queue, data=self.data, daemon_directory=DAEMON_DIRECTORY,
            domain=DOMAIN, user=USER, mailboxes=self.mailboxes, uid=VIRTUAL_UID,
            gid=VIRTUAL_GID, log=self.log, root=self.root))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port))
        # Pre-create the Maildir so a watcher can observe new/ from the first message on.
        for sub in ("", "tmp", "new", "cur"):
            p = self.maildir / sub
            p.mkdir(parents=True, exist_ok=True)
        for p in (self.mailboxes / DOMAIN, self.maildir, self.maildir / "tmp",
                  self.maildir / "new", self.maildir / "cur"):
            os.chown(p, VIRTUAL_UID, VIRTUAL_GID)
            p.chmod(0o700)

    def _postfix(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> None:
        res = self._postfix("start", timeout=START_TIMEOUT)
        if res.returncode != 0:
            raise PostfixError(f"postfix start failed ({res.returncode}): {res.stderr.strip()}"
                               f"\n{self.log_tail()}")
        self.started = True
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise PostfixError(f"postfix not answering on 127.0.0.1:{self.port}\n{self.log_tail()}")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if not self.started:
            return
        pid = self.master_pid()
        res = self._postfix("stop", timeout=STOP_TIMEOUT)
        self.started = False
        # `postfix stop` returns before master has exited; wait for our master PID to go.
        deadline = time.monotonic() + STOP_TIMEOUT
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            if pid is not None:
                os.kill(pid, 9)
        if res.returncode != 0:
            raise PostfixError(f"postfix stop failed: {res.stderr.strip()}")

    def queue_count(self) -> int:
        """Messages still in the private queue (incoming, active, deferred, ...)."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
            for _dirpath, _dirs, files in os.walk(self.queue / sub):
                n += len(files)
        return n

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no maillog)"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _smoke(root: str) -> None:
    """Start, send one message with smtplib, wait for it in the Maildir, stop."""
    import smtplib
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    inst = PostfixInstance(Path(root), port)
    inst.setup()
    inst.start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@test.com", ["test@test.com"], b"Subject: smoke\r\n\r\nhello\r\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not os.listdir(inst.maildir / "new"):
            time.sleep(0.05)
        print("delivered:", os.listdir(inst.maildir / "new"))
    finally:
        inst.stop()
        print(inst.log_tail())


if __name__ == "__main__":
    _smoke(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/postfix-smoke")
