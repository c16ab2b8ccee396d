"""An independent DKIM verifier for tests: OpenDKIM's C library (libopendkim, Debian's
libopendkim11, which opendkim-tools brings), driven through ctypes.

`opendkim-testmsg` verifies with the same library but asks the system resolver, which cannot
be pointed at a DNS server on a kernel-chosen port. So we call the library ourselves and give it
a key-lookup callback (`dkim_set_key_lookup`) that asks the test's loopback DNS server with
dnspython: the keys come from the same DNS the product uses, the canonicalisation, hashing and
RSA/Ed25519 checks are OpenDKIM's, not dkimpy's (which our verifier uses) nor ours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from tests.conftest import IN_CI

import pytest

# dkim.h
DKIM_STAT_OK = 0
DKIM_CBSTAT_CONTINUE, DKIM_CBSTAT_NOTFOUND, DKIM_CBSTAT_ERROR = 0, 3, 4
DKIM_SIGFLAG_PASSED = 0x04
DKIM_SIGBH_MATCH = 0
DNS_TIMEOUT = 5.0

_KEY_LOOKUP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.POINTER(ctypes.c_ubyte), ctypes.c_size_t)


def load_library() -> ctypes.CDLL:
    name = ctypes.util.find_library("opendkim") or "libopendkim.so.11"
    try:
        return ctypes.CDLL(name)
    except OSError:
        if IN_CI:
            pytest.fail("libopendkim (Debian opendkim-tools / libopendkim11) is required in CI")
        pytest.skip("libopendkim not installed")


@dataclass(frozen=True)
class SigCheck:
    domain: str
    selector: str
    passed: bool
    body_ok: bool
    error: str


class OpenDKIM:
    def __init__(self, nameserver: tuple[str, int]) -> None:
        self.host, self.port = nameserver
        lib = self.lib = load_library()
        lib.dkim_init.restype = ctypes.c_void_p
        lib.dkim_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.dkim_close.argtypes = [ctypes.c_void_p]
        lib.dkim_verify.restype = ctypes.c_void_p
        lib.dkim_verify.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int)]
        lib.dkim_chunk.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.dkim_eom.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_bool)]
        lib.dkim_getsiglist.argtypes = [ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p)),
                                        ctypes.POINTER(ctypes.c_int)]
        lib.dkim_sig_getflags.restype = ctypes.c_uint
        lib.dkim_sig_getflags.argtypes = [ctypes.c_void_p]
        lib.dkim_sig_getbh.argtypes = [ctypes.c_void_p]
        lib.dkim_sig_getdomain.restype = ctypes.c_char_p
        lib.dkim_sig_getdomain.argtypes = [ctypes.c_void_p]
        lib.dkim_sig_getselector.restype = ctypes.c_char_p
        lib.dkim_sig_getselector.argtypes = [ctypes.c_void_p]
        lib.dkim_sig_geterror.argtypes = [ctypes.c_void_p]
        lib.dkim_sig_geterrorstr.restype = ctypes.c_char_p
        lib.dkim_sig_geterrorstr.argtypes = [ctypes.c_int]
        lib.dkim_free.argtypes = [ctypes.c_void_p]
        lib.dkim_set_key_lookup.argtypes = [ctypes.c_void_p, _KEY_LOOKUP]
        self.handle = lib.dkim_init(None, None)
        assert self.handle, "dkim_init failed"
        self._callback = _KEY_LOOKUP(self._key_lookup)      # kept alive with self
        lib.dkim_set_key_lookup(self.handle, self._callback)
        self.lookups: list[str] = []

    def close(self) -> None:
        if self.handle:
            self.lib.dkim_close(self.handle)
            self.handle = None

    def _key_lookup(self, _dkim, sig, buf, buflen) -> int:
        selector = self.lib.dkim_sig_getselector(sig).decode()
        domain = self.lib.dkim_sig_getdomain(sig).decode()
        name = f"{selector}._domainkey.{domain}"
        self.lookups.append(name)
        try:
            query = dns.message.make_query(name, dns.rdatatype.TXT)
            reply = dns.query.udp(query, self.host, port=self.port, timeout=DNS_TIMEOUT)
            if reply.flags & dns.flags.TC:
                reply = dns.query.tcp(query, self.host, port=self.port, timeout=DNS_TIMEOUT)
        except Exception:
            return DKIM_CBSTAT_ERROR
        if reply.rcode() == dns.rcode.NXDOMAIN:
            return DKIM_CBSTAT_NOTFOUND
        texts = [b"".join(r.strings) for rrset in reply.answer
                 if rrset.rdtype == dns.rdatatype.TXT for r in rrset]
        if not texts:
            return DKIM_CBSTAT_NOTFOUND
        data = texts[0][:buflen - 1] + b"\0"
        ctypes.memmove(buf, data, len(data))
        return DKIM_CBSTAT_CONTINUE

    def verify(self, message: bytes) -> list[SigCheck]:
        """One entry per DKIM-Signature, as OpenDKIM judged it."""
        wire = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        status = ctypes.c_int(0)
        dkim = self.lib.dkim_verify(self.handle, b"test", None, ctypes.byref(status))
        assert dkim, f"dkim_verify failed ({status.value})"
        try:
            self.lib.dkim_chunk(dkim, wire, len(wire))
            self.lib.dkim_chunk(dkim, None, 0)
            testkey = ctypes.c_bool(False)
            self.lib.dkim_eom(dkim, ctypes.byref(testkey))
            sigs = ctypes.POINTER(ctypes.c_void_p)()
            count = ctypes.c_int(0)
            if self.lib.dkim_getsiglist(dkim, ctypes.byref(sigs), ctypes.byref(count)) \
                    != DKIM_STAT_OK:
                return []
            out = []
            for i in range(count.value):
                sig = sigs[i]
                flags = self.lib.dkim_sig_getflags(sig)
                body_ok = self.lib.dkim_sig_getbh(sig) == DKIM_SIGBH_MATCH
                error = self.lib.dkim_sig_geterrorstr(self.lib.dkim_sig_geterror(sig))
                out.append(SigCheck(
                    (self.lib.dkim_sig_getdomain(sig) or b"").decode(),
                    (self.lib.dkim_sig_getselector(sig) or b"").decode(),
                    bool(flags & DKIM_SIGFLAG_PASSED) and body_ok, body_ok,
                    (error or b"").decode()))
            return out
        finally:
            self.lib.dkim_free(dkim)
