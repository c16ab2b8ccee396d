"""The `mailappliance` command's side of the admin protocol (stat, queue, reload, relay).

A small blocking client (stdlib sockets): the command runs once and exits, no reactor needed.
It connects to the first unix admin endpoint of the instance's settings (or, if there is none,
the loopback TCP one with the token from ``[admin] token_file``), sends one command line and
prints the reply block. Exit status: 0 on success, 1 when the server refused or is not
running (one line on stderr), as DESIGN.md section 2 says.

Domain, user and alias commands do not come here: the CLI runs them directly on the user
store whether or not the server runs (SQLite WAL; the server reads the store on every lookup,
so it sees each change at once). See cli.py.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from typing import TextIO

from mailappliance.admin.protocol import ReplyReader
from mailappliance.admin.service import _split_unix, read_token
from mailappliance.config import ConfigError

EXIT_OK, EXIT_REFUSED = 0, 1
# How long the command waits for a reply: a reload parses the rules file and a queue list
# reads every envelope in the queue, which takes seconds for a large queue, not minutes.
REPLY_TIMEOUT = 120.0
CONNECT_TIMEOUT = 10.0
# The reply is read in pieces of this size; replies are bounded by the server
# (protocol.MAX_REPLY_LINES lines of at most MAX_REPLY_LINE characters).
READ_SIZE = 65536


class NotRunning(Exception):
    pass


class Refused(Exception):
    pass


def command_line(args) -> str:
    area = args.area
    if area == "stat":
        return "stat --json" if getattr(args, "json", False) else "stat"
    if area == "reload":
        return "reload"
    if area == "relay":
        return f"relay {args.action}"
    if area == "queue":
        if args.action == "remove":
            return "queue remove " + " ".join(args.id) + (" --bounce" if args.bounce else "")
        if args.action == "show":
            return f"queue show {args.id}"
        if args.action == "flush":
            return "queue flush" + (f" {args.target}" if args.target else "")
        if args.action == "list":
            line = "queue list"
            if args.json:
                line += " --json"
            if args.limit:
                line += f" --limit {args.limit}"
            if args.after:
                line += f" --after {args.after}"
            return line
        return f"queue {args.action}"
    raise ValueError(f"{area} is not an admin protocol command")


def _ready_ports(settings) -> list:
    try:
        info = json.loads((settings.data / "run" / "ready.json").read_text())
        return list(info.get("listen", {}).get("admin", []))
    except (OSError, ValueError, AttributeError):
        return []


def connect(settings, timeout: float = CONNECT_TIMEOUT) -> tuple[socket.socket, str | None]:
    """A connected socket to the instance's admin endpoint and the token it needs (or None)."""
    endpoints = list(settings.listen.admin)
    unix = [e for e in endpoints if e.startswith("unix:")]
    if unix:
        path, _ = _split_unix(unix[0])
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise NotRunning(f"the server is not running (no admin socket at {path}: "
                             f"{e.strerror})") from None
        except PermissionError:
            s.close()
            raise Refused(f"permission denied on {path}: run as the data directory's owner "
                          "or root, or as a member of [admin] socket_group") from None
        except OSError as e:
            s.close()
            raise NotRunning(f"cannot connect to {path}: {e.strerror or e}") from None
        return s, None
    tcp = [e for e in endpoints if e.startswith(("tcp:", "tcp6:"))]
    if not tcp:
        raise Refused("no admin endpoint in the configuration ([listen] admin)")
    desc = tcp[0]
    m = re.search(r"(?:^|:)interface=([^:]+)", desc)
    host = m.group(1).replace("\\", "") if m else "127.0.0.1"
    port = int(desc.split(":")[1])
    if port == 0:
        ports = [p for p in _ready_ports(settings) if isinstance(p, int)]
        if not ports:
            raise NotRunning("the server is not running (no run/ready.json)")
        port = ports[0]
    try:
        token = read_token(settings.admin.token_file)
    except ConfigError as e:
        raise Refused(str(e)) from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except OSError as e:
        s.close()
        raise NotRunning(f"the server is not running (nothing on {host}:{port}: "
                         f"{e.strerror or e})") from None
    return s, token


def request(settings, lines: list[str], timeout: float = REPLY_TIMEOUT) -> list[tuple[bool, list[str]]]:
    """Send `lines` (commands and secret lines) and return the reply blocks (ok, lines)."""
    s, token = connect(settings)
    commands = len(list(_commands(lines)))
    prefix = ["auth", token] if token is not None else []
    # auth (if any), the commands, and quit each get one reply block.
    expected = (1 if prefix else 0) + commands + 1
    reader = ReplyReader()
    try:
        s.settimeout(timeout)
        s.sendall(("\n".join(prefix + lines + ["quit"]) + "\n").encode("utf-8"))
        while len(reader.replies) < expected:
            try:
                data = s.recv(READ_SIZE)
            except socket.timeout:
                raise Refused(f"no reply from the server within {timeout:.0f} s") from None
            if not data:
                break
            reader.receive_data(data)
    finally:
        s.close()
    replies = reader.replies
    if prefix:
        if not replies or not replies[0][0]:
            why = " ".join(replies[0][1]) if replies else "connection closed"
            raise Refused(f"admin token refused: {why}")
        replies = replies[1:]
    if len(replies) < commands:
        raise Refused("the server closed the connection before replying")
    return replies[:commands]


def _commands(lines: list[str]):
    """Lines that are commands (a `user add`/`user passwd` line is followed by a secret)."""
    skip = False
    for line in lines:
        if skip:
            skip = False
            continue
        words = line.split()
        if words[:2] in (["user", "add"], ["user", "passwd"]) or words[:1] == ["auth"]:
            skip = True
        yield line


def _group_json(lines: list[str]) -> tuple[list[dict], dict]:
    """`queue list --json` on the wire (one object per recipient, then the page's totals)
    -> one object per message, and the totals."""
    messages: list[dict] = []
    page: dict = {}
    for line in lines:
        record = json.loads(line)
        if "total" in record:
            page = record
            continue
        rcpt = {k: record.pop(k) for k in ("address", "state", "attempts", "last_try",
                                            "last_error")}
        if not messages or messages[-1]["id"] != record["id"]:
            record["recipients"] = []
            messages.append(record)
        messages[-1]["recipients"].append(rcpt)
    return messages, page


def _queue_list(args, settings, out: TextIO) -> int:
    """queue list: one page, or with --all every page in turn (each page one request, so
    memory stays one page however large the queue)."""
    after = args.after
    while True:
        args.after = after
        [(ok, lines)] = request(settings, [command_line(args)])
        if not ok:
            raise Refused(lines[0][len("error:"):].strip() if lines else "refused")
        if args.json:
            messages, page = _group_json(lines)
            for m in messages:
                print(json.dumps(m), file=out)
            nxt = page.get("next_after")
        else:
            more = [l for l in lines if l.startswith("... ") and " --after " in l]
            nxt = more[0].rsplit(" ", 1)[1] if more else None
            body = lines if not args.all else [
                l for l in lines if not (nxt and l in more) and not (
                    nxt and l.endswith(" messages") and l.split()[0].isdigit())]
            for line in body:
                print(line, file=out)
        if not args.all or not nxt:
            return EXIT_OK
        after = str(nxt)


def run(args, settings, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Entry from cli.py for stat, queue, reload and relay."""
    out = out or sys.stdout
    err = err or sys.stderr
    if args.area == "queue" and args.action == "list":
        try:
            return _queue_list(args, settings, out)
        except (NotRunning, Refused) as e:
            print(f"mailappliance: {e}", file=err)
            return EXIT_REFUSED
        except OSError as e:
            print(f"mailappliance: admin connection failed: {e.strerror or e}", file=err)
            return EXIT_REFUSED
    try:
        [(ok, lines)] = request(settings, [command_line(args)])
    except (NotRunning, Refused) as e:
        print(f"mailappliance: {e}", file=err)
        return EXIT_REFUSED
    except OSError as e:
        print(f"mailappliance: admin connection failed: {e.strerror or e}", file=err)
        return EXIT_REFUSED
    if not ok:
        first = lines[0][len("error:"):].strip() if lines else "refused"
        print(f"mailappliance: {first}", file=err)
        for line in lines[1:]:
            print(line, file=err)
        return EXIT_REFUSED
    for line in lines:
        print(line, file=out)
    return EXIT_OK
