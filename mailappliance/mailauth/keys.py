"""DKIM keys: generation, the files under data/dkim/, the TXT records, and the registry a
running server reads them through.

A store in the sense of CONVENTIONS.md: blocking file I/O, no Twisted. One file per key,

    data/dkim/<selector>._domainkey.<domain>.pem      PKCS#8 PEM, RSA or Ed25519, mode 0600

in a directory of mode 0700, both owned by the data directory's owner (the CLI switches to that
user before calling `generate`, see mailappliance/privileges.py). The file is named after the
DNS name its public key is published at, so one flat directory holds every domain's keys and
a single stat() of it tells whether anything was added, removed or replaced: `KeyRegistry`
re-reads the directory only when its modification time moved (or is too recent to trust,
like git's "racily clean" index entries), at most once per message signed.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("rsa", "ed25519")
# RFC 8301 section 3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048;
# 2048 is what the large mailbox providers expect and what every verifier handles in one
# 512-octet UDP answer's worth of TXT (about 410 octets of record).
RSA_BITS = 2048
RSA_MIN_BITS = 1024
RSA_EXPONENT = 65537
SUFFIX = ".pem"
DIR_MODE = 0o700
FILE_MODE = 0o600
# Key files larger than this are not keys (an RSA 4096 PEM is about 3.3 KB).
MAX_KEY_FILE = 16384
# Key files are read at most this many per scan: a directory full of junk cannot stall a scan.
MAX_KEY_FILES = 1000
# A directory whose mtime is this close to the time of our last scan may change again within
# the file system's timestamp granularity without its mtime moving: look again next time.
RACY_SECONDS = 2.0
# RFC 1035 section 2.3.1 (LDH labels), RFC 6376 section 3.1 (a selector is one or more labels).
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class DKIMKeyError(Exception):
    """A request about keys that cannot be done (exists already, bad name); str() is one line."""


def check_domain(domain: str) -> str:
    name = domain.strip().lower().rstrip(".")
    if len(name) > 253 or "." not in name or not _NAME.fullmatch(name):
        raise DKIMKeyError(f"{domain!r} is not a domain name")
    return name


def check_selector(selector: str) -> str:
    name = selector.strip().lower()
    if len(name) > 63 or not _NAME.fullmatch(name) or name.endswith("_domainkey"):
        raise DKIMKeyError(f"{selector!r} is not a DKIM selector (letters, digits, '-', '.')")
    return name


def key_dir(data: Path) -> Path:
    return Path(data) / "dkim"


def key_name(domain: str, selector: str) -> str:
    """The DNS name the public key is published at (RFC 6376 section 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def key_path(data: Path, domain: str, selector: str) -> Path:
    return key_dir(data) / (key_name(domain, selector) + SUFFIX)


def parse_key_filename(filename: str) -> tuple[str, str] | None:
    """(domain, selector) from a key file's name, or None if it is not one of ours."""
    if not filename.endswith(SUFFIX):
        return None
    selector, sep, domain = filename[:-len(SUFFIX)].partition("._domainkey.")
    if not sep:
        return None
    try:
        return check_domain(domain), check_selector(selector)
    except DKIMKeyError:
        return None


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str                 # "rsa" | "ed25519"
    private_key: object            # cryptography private key object
    path: Path

    @property
    def name(self) -> str:
        return key_name(self.domain, self.selector)

    @property
    def sign_algorithm(self) -> str:
        """The a= tag: rsa-sha256 (RFC 6376; rsa-sha1 is obsolete, RFC 8301) or ed25519-sha256
        (RFC 8463)."""
        return "rsa-sha256" if self.algorithm == "rsa" else "ed25519-sha256"

    def txt_record(self) -> str:
        return txt_record(self.private_key)


def txt_record(private_key) -> str:
    """The key record (RFC 6376 section 3.6.1): v=DKIM1; k=...; p=<public key, base64>.

    RSA: p= is the DER SubjectPublicKeyInfo, as opendkim-genkey writes it; Ed25519: the raw
    32-octet public key (RFC 8463 section 4.2)."""
    public = private_key.public_key()
    if isinstance(private_key, rsa.RSAPrivateKey):
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")


def zone_line(name: str, record: str) -> str:
    """The record as one zone-file line, split into character-strings of at most 255 octets
    (RFC 1035 section 3.3.14; a DKIM verifier joins them, RFC 6376 section 3.6.2.2)."""
    chunks = [record[i:i + 250] for i in range(0, len(record), 250)]
    return f'{name}. IN TXT ( {" ".join(chr(34) + c + chr(34) for c in chunks)} )'


def new_private_key(algorithm: str):
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise DKIMKeyError(f"unknown algorithm {algorithm!r} (rsa or ed25519)")


def load_private_key(pem: bytes, path: Path | str = "key"):
    """(algorithm, key object) from PEM bytes; DKIMKeyError with one line on anything else."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        why = "encrypted (needs a password)" if "password" in str(e).lower() else \
            "not a PEM private key"
        raise DKIMKeyError(f"{path}: {why}") from None
    except Exception as e:       # cryptography's UnsupportedAlgorithm and the like
        raise DKIMKeyError(f"{path}: unusable key ({type(e).__name__})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < RSA_MIN_BITS:
            raise DKIMKeyError(f"{path}: RSA key of {key.key_size} bits; RFC 8301 needs at least "
                            f"{RSA_MIN_BITS}")
        return "rsa", key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519", key
    raise DKIMKeyError(f"{path}: {type(key).__name__} keys cannot sign DKIM (rsa or ed25519)")


def read_key(path: Path) -> DKIMKey:
    """Load one key file; DKIMKeyError with one line (file, what is wrong) on failure."""
    parsed = parse_key_filename(path.name)
    if parsed is None:
        raise DKIMKeyError(f"{path}: not named <selector>._domainkey.<domain>{SUFFIX}")
    domain, selector = parsed
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise DKIMKeyError(f"{path}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DKIMKeyError(f"{path}: not a regular file")
        if st.st_size > MAX_KEY_FILE:
            raise DKIMKeyError(f"{path}: {st.st_size} bytes is too large for a key")
        pem = os.read(fd, MAX_KEY_FILE + 1)
    except OSError as e:
        raise DKIMKeyError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    algorithm, key = load_private_key(pem, path)
    return DKIMKey(domain, selector, algorithm, key, path)


def generate(data: Path, domain: str, selector: str, algorithm: str = "rsa") -> DKIMKey:
    """Make a key and store it; never overwrites (a new key means a new selector).

    The directory is created 0700 and the file 0600 whatever the umask; the file is written
    under a temporary name, fsynced, and linked into place (link fails if the name exists, so
    two keygens cannot both win), then the directory is fsynced.
    """
    domain, selector = check_domain(domain), check_selector(selector)
    if algorithm not in ALGORITHMS:
        raise DKIMKeyError(f"unknown algorithm {algorithm!r} (rsa or ed25519)")
    directory = key_dir(data)
    final = key_path(data, domain, selector)
    if final.exists():
        raise DKIMKeyError(f"a key for {key_name(domain, selector)} exists already ({final}); "
                        f"choose another --selector")
    try:
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)
    except OSError as e:
        raise DKIMKeyError(f"cannot create {directory}: {e.strerror}") from None
    key = new_private_key(algorithm)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = directory / f".tmp.{os.getpid()}.{final.name}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise DKIMKeyError(f"a key for {key_name(domain, selector)} exists already "
                            f"({final}); choose another --selector") from None
    except OSError as e:
        raise DKIMKeyError(f"cannot write {final}: {e.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return DKIMKey(domain, selector, algorithm, key, final)


def scan(data: Path) -> tuple[list[DKIMKey], list[str]]:
    """Every key under data/dkim/ (sorted by domain, selector) and one line per problem."""
    directory = key_dir(data)
    keys: list[DKIMKey] = []
    problems: list[str] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [], [f"{directory}: cannot list: {e.strerror}"]
    for name in names[:MAX_KEY_FILES]:
        if name.startswith("."):
            continue
        path = directory / name
        try:
            keys.append(read_key(path))
        except DKIMKeyError as e:
            problems.append(str(e))
    keys.sort(key=lambda k: (k.domain, k.selector))
    return keys, problems


def check(data: Path, scanned: tuple[list[DKIMKey], list[str]] | None = None) -> list[str]:
    """`mailappliance check`: one line per unusable key file or unsafe permission.
    `scanned`: what scan(data) returned, when the caller has it already (one read of each
    key file, not two)."""
    directory = key_dir(data)
    keys, problems = scanned if scanned is not None else scan(data)
    problems = list(problems)
    if not directory.exists():
        return problems
    st = os.stat(directory)
    if st.st_mode & 0o077:
        problems.append(f"{directory}: mode {stat.S_IMODE(st.st_mode):04o} lets others in; "
                        f"chmod 700")
    for key in keys:
        mode = stat.S_IMODE(os.stat(key.path).st_mode)
        if mode & 0o077:
            problems.append(f"{key.path}: mode {mode:04o} lets others read the private key; "
                            f"chmod 600")
    return problems


class KeyRegistry:
    """The keys a running server signs with, re-read when data/dkim/ changes.

    `keys_for(domain)` is called once per message to sign (from a pool thread): one stat() of
    the directory, a re-scan only when it changed. `report(line)` receives each new problem
    once (a malformed or unreadable file), for the log. Thread-safe.
    """

    def __init__(self, data: Path, report: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.data = Path(data)
        self.directory = key_dir(self.data)
        self._report = report or (lambda line: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._scanned_at = 0.0
        self._by_domain: dict[str, list[DKIMKey]] = {}
        self._problems: list[str] = []
        self.scans = 0

    def refresh(self) -> bool:
        """Re-read the directory if it changed; True if it was read."""
        with self._lock:
            token, racy = self._look()
            now = self._clock()
            if token == self._seen and not racy:
                return False
            keys, problems = scan(self.data)
            self.scans += 1
            self._seen = token
            self._scanned_at = now
            by_domain: dict[str, list[DKIMKey]] = {}
            for key in keys:
                by_domain.setdefault(key.domain, []).append(key)
            # RSA first: a verifier that stops at the first signature it can check sees the
            # one every verifier understands.
            for group in by_domain.values():
                group.sort(key=lambda k: (k.algorithm != "rsa", k.selector))
            self._by_domain = by_domain
            new = [p for p in problems if p not in self._problems]
            self._problems = problems
        for line in new:
            self._report(line)
        return True

    def _look(self) -> tuple[tuple[int, int], bool]:
        """The directory's (mtime, inode) and whether that mtime is too recent to trust."""
        try:
            st = os.stat(self.directory)
            token = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            token = (0, 0)
        except OSError as e:
            token = (-1, e.errno or 0)
        return token, token[0] > 0 and self._clock() - token[0] / 1e9 < RACY_SECONDS

    def needs_scan(self) -> bool:
        """Would keys_for() re-read the directory (one stat, never a scan)? False means the
        keys in memory are current and signing reads no file."""
        token, racy = self._look()
        return token != self._seen or racy

    def maybe_keys(self) -> bool:
        """Might a message be signed? Cheap enough for the reactor thread (one stat, never a
        scan): False only when the last scan found no key and the directory has not changed
        since. Callers that would hold a message in memory for signing ask this first, so a
        server without keys streams every message as it always did."""
        return bool(self._by_domain) or self.needs_scan()

    def keys_for(self, domain: str) -> list[DKIMKey]:
        self.refresh()
        return list(self._by_domain.get(domain.lower().rstrip("."), ()))

    def has_keys(self, domain: str) -> bool:
        """Without a directory check (call refresh() once first)."""
        return bool(self._by_domain.get(domain.lower().rstrip(".")))

    def cached_keys(self, domain: str) -> list[DKIMKey]:
        """keys_for() without the directory check (call refresh() once first)."""
        return list(self._by_domain.get(domain.lower().rstrip("."), ()))

    def domains(self) -> list[str]:
        return sorted(self._by_domain)

    def problems(self) -> list[str]:
        return list(self._problems)
