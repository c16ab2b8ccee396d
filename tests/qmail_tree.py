"""Synthetic qmail + vpopmail trees, written from the documented formats (qmail's control(5),
qmail-users(5), dot-qmail(5); vpopmail's vpasswd and users/assign entries; ucspi-tcp's tcprules
source), for the importer's tests and benchmarks/import_bench.py.

Paths inside the files are those of the old host (/home/vpopmail/...), as on a real machine;
the tree itself lives under a temporary root, so the importer's rebasing is always exercised.
Password hashes are made with libpass (the same formats glibc's crypt(3) writes; the unit tests
check a few against hashes glibc made).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

OLD_HOME = "/home/vpopmail"
PASSWORD = "Old-pass1"

_BASE_TIME = 1_700_000_000


def hash_for(scheme: str, password: str) -> str:
    from passlib import hash as h
    if scheme == "md5-crypt":
        return h.md5_crypt.hash(password)
    if scheme == "sha256-crypt":
        return h.sha256_crypt.using(rounds=5000).hash(password)
    if scheme == "sha512-crypt":
        return h.sha512_crypt.using(rounds=5000).hash(password)
    if scheme == "des-crypt":
        return h.des_crypt.hash(password)
    if scheme == "unknown":      # yescrypt, which vpopmail on a modern libxcrypt can write
        return "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7"
    if scheme == "none":
        return ""
    raise ValueError(scheme)


@dataclass
class Msg:
    folder: str          # "new", "cur", "tmp", ".Sent/cur", ...
    name: str
    body: bytes = b""


@dataclass
class TUser:
    name: str
    scheme: str = "md5-crypt"     # or "clear" (md5-crypt hash + clear-text field)
    password: str = PASSWORD
    quota: str = "NOQUOTA"
    flags: int = 0
    subdir: str = ""              # vpopmail's hashed layout for big domains: "0", "1", ...
    messages: list[Msg] = field(default_factory=list)
    dotqmail: str | None = None
    maildir: bool = True


@dataclass
class TDomain:
    name: str
    users: list[TUser]
    dotqmails: dict[str, str] = field(default_factory=dict)
    extra_vpasswd: list[str] = field(default_factory=list)


@dataclass
class QmailTree:
    root: Path
    qmail: Path
    vpopmail: Path
    tcp_rules: Path
    domains: list[TDomain]

    def domain_dir(self, domain: str) -> Path:
        return self.vpopmail / "domains" / domain

    def user_dir(self, domain: str, user: TUser) -> Path:
        sub = f"{user.subdir}/" if user.subdir else ""
        return self.vpopmail / "domains" / domain / f"{sub}{user.name}"

    def args(self) -> list[str]:
        return ["--qmail", str(self.qmail), "--vpopmail", str(self.vpopmail),
                "--tcp-rules", str(self.tcp_rules)]


def message(subject: str, n: int = 0) -> bytes:
    return (f"Return-Path: <sender@example.org>\nDelivered-To: someone\n"
            f"From: sender@example.org\nSubject: {subject}\nMessage-ID: <{n}.{subject}@x>\n\n"
            f"Body of {subject}\n").encode()


def write_tree(root: Path, domains: list[TDomain], *, control: dict[str, str],
               tcp_rules: str, extra_assign: list[str] = (), extra_virtual: list[str] = (),
               hashes: dict[str, str] | None = None) -> QmailTree:
    """Write the tree. `hashes` caches one hash per scheme (the benchmark's 10,000 users need
    not each pay for a hash)."""
    qmail = root / "var" / "qmail"
    vpop = root / "home" / "vpopmail"
    (qmail / "control").mkdir(parents=True)
    (qmail / "users").mkdir()
    (qmail / "alias").mkdir()
    (qmail / "alias" / ".qmail-postmaster").write_text("root\n")
    (vpop / "etc").mkdir(parents=True)
    for name, text in control.items():
        (qmail / "control" / name).write_text(text)
    assign, virtual = [], []
    t = _BASE_TIME
    for d in domains:
        assign.append(f"+{d.name}-:{d.name}:89:89:{OLD_HOME}/domains/{d.name}:-::")
        virtual.append(f"{d.name}:{d.name}")
        ddir = vpop / "domains" / d.name
        ddir.mkdir(parents=True)
        lines = []
        for u in d.users:
            sub = f"{u.subdir}/" if u.subdir else ""
            udir = ddir / f"{sub}{u.name}"
            scheme = "md5-crypt" if u.scheme == "clear" else u.scheme
            if hashes is not None:
                hashed = hashes.setdefault(f"{scheme}:{u.password}", hash_for(scheme, u.password))
            else:
                hashed = hash_for(scheme, u.password)
            fields = [u.name, hashed, "1", str(u.flags), u.name.title(),
                      f"{OLD_HOME}/domains/{d.name}/{sub}{u.name}", u.quota]
            if u.scheme == "clear":
                fields.append(u.password)
            lines.append(":".join(fields))
            udir.mkdir(parents=True)
            if u.maildir:
                for s in ("tmp", "new", "cur"):
                    (udir / "Maildir" / s).mkdir(parents=True)
            for m in u.messages:
                folder = udir / "Maildir" / m.folder
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / m.name
                with open(path, "wb") as f:
                    f.write(m.body or message(m.name, t))
                t += 1
                os.utime(path, (t, t))
            if u.dotqmail is not None:
                (udir / ".qmail").write_text(u.dotqmail)
        lines += d.extra_vpasswd
        (ddir / "vpasswd").write_text("\n".join(lines) + "\n")
        (ddir / "vpasswd.cdb").write_bytes(b"\0" * 2048)
        for fname, text in d.dotqmails.items():
            (ddir / fname).write_text(text)
    (qmail / "users" / "assign").write_text("\n".join(assign + list(extra_assign)) + "\n.\n")
    (qmail / "control" / "virtualdomains").write_text(
        "\n".join(virtual + list(extra_virtual)) + "\n")
    rules = root / "etc" / "tcp.smtp"
    rules.parent.mkdir()
    rules.write_text(tcp_rules)
    return QmailTree(root, qmail, vpop, rules, domains)


# --- the rich sample every importer test starts from --------------------------------------------

SAMPLE_RULES = """\
# tcp.smtp of the old host
127.0.0.1:allow,RELAYCLIENT="",RBLSMTPD=""
127.0.0.2:allow,RBLSMTPD="-Blocked by the old rules"
192.168.1.:allow,RELAYCLIENT=""
=mail.example.com:allow,RELAYCLIENT=""
10.0.0.1:allow,QMAILQUEUE="/var/qmail/bin/qmail-scanner-queue.pl"
:allow
"""
# Line numbers in SAMPLE_RULES the importer must report.
SAMPLE_RULES_REFUSED = (5,)

SAMPLE_CONTROL = {
    "me": "mail.example.com\n",
    "defaultdomain": "example.com\n",
    "rcpthosts": "example.com\nexample.net\nalias.example.com\nbackup.example.org\n"
                 "mail.example.com\n",
    "locals": "mail.example.com\nlocalhost\n",
    "databytes": "20000000\n",
    "smtproutes": ":smarthost.example.org:2525\nlists.example.org:[127.0.0.1]:2526\n"
                  ".example.info:relay.example.info\n",
    "concurrencylocal": "5\n",
    "concurrencyremote": "40\n",
    "queuelifetime": "345600\n",
    "timeoutsmtpd": "600\n",
    "badmailfrom": "spammer@example.org\n",
}


def sample_users() -> list[TDomain]:
    alice_msgs = [Msg("new", "1700000001.1001.mail.example.com"),
                  Msg("new", "1700000002.1002.mail.example.com"),
                  Msg("cur", "1700000003.1003.mail.example.com:2,S"),
                  Msg("cur", "1700000004.1004.mail.example.com:2,RS"),
                  Msg("tmp", "1700000005.1005.mail.example.com"),
                  Msg(".Sent/cur", "1700000006.1006.mail.example.com:2,S")]
    example_com = TDomain("example.com", [
        TUser("postmaster", "md5-crypt"),
        TUser("alice", "md5-crypt", quota="5242880S", messages=alice_msgs),
        TUser("bob", "sha512-crypt", dotqmail="&bob@elsewhere.example.org\n./Maildir/\n",
              messages=[Msg("cur", "1700000010.2001.mail.example.com:2,")]),
        TUser("carol", "sha256-crypt", quota="10M", messages=[
            Msg("new", "1700000020.3001.mail.example.com")]),
        TUser("dave", "des-crypt", password="Desp4ss!", flags=0x02),
        TUser("erin", "clear", password="Clear-text9", quota="1000000S,500C"),
        TUser("frank", "unknown"),
        TUser("grace", "sha512-crypt", subdir="0", messages=[
            Msg("new", "1700000030.4001.mail.example.com")]),
    ], dotqmails={
        ".qmail-default": "| /home/vpopmail/bin/vdelivermail '' bounce-no-mailbox\n",
        ".qmail-sales": "&alice@example.com\nbob@example.com\n",
        ".qmail-info": f"{OLD_HOME}/domains/example.com/carol/Maildir/\n",
        ".qmail-first:last": "# Alice's other name\nalice\n",
        ".qmail-list": "|/usr/bin/ezmlm-send /home/vpopmail/domains/example.com/list\n",
        ".qmail-help-default": "&alice@example.com\n",
        ".qmail-alice": "&carol@example.com\n",
    }, extra_vpasswd=["broken:onlythree:fields"])
    example_net = TDomain("example.net", [
        TUser("postmaster", "sha512-crypt"),
        TUser("heidi", "md5-crypt", messages=[Msg("new", "1700000040.5001.mail.example.net"),
                                              Msg("cur", "1700000041.5002.mail.example.net:2,S")]),
    ], dotqmails={".qmail-default": "| /home/vpopmail/bin/vdelivermail '' delete\n"})
    return [example_com, example_net]


def sample_tree(root: Path) -> QmailTree:
    tree = write_tree(root, sample_users(), control=SAMPLE_CONTROL, tcp_rules=SAMPLE_RULES,
                      extra_assign=[f"+alias.example.com-:example.com:89:89:{OLD_HOME}/domains/"
                                    "example.com:-::"],
                      extra_virtual=["alias.example.com:alias.example.com"])
    (tree.vpopmail / "etc" / "defaultdomain").write_text("example.com\n")
    return tree


def sample_user(tree: QmailTree, address: str) -> TUser:
    local, domain = address.split("@")
    for d in tree.domains:
        if d.name == domain:
            for u in d.users:
                if u.name == local:
                    return u
    raise KeyError(address)


def uidls(user: TUser) -> list[str]:
    """What qmail-pop3d lists as UIDLs for this user: new/ and cur/ names up to ':'."""
    return sorted(m.name.split(":", 1)[0] for m in user.messages if m.folder in ("new", "cur"))
