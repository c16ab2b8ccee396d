"""DKIM keys, signing and verification as pure code: our signatures verify with dkimpy (a
different implementation of the hashing and the header selection than ours), alterations fail,
From: is oversigned; key files are 0600 in a 0700 directory, never overwritten, and the
registry sees a new key without a restart. OpenDKIM's verdict on the same signatures is in
tests/integration/test_mailauth_opendkim.py."""

from __future__ import annotations

import os
import stat

import dkim
import pytest

from mailappliance.mailauth import dkimverify, keys, sign
from mailappliance.mailauth.lookup import DNSResult
from tests.dkim_support import NOW, keypair  # noqa: F401 - keypair is a fixture

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
           b"Subject: hello   there\r\n\tfolded\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <1@example.com>\r\nX-Unsigned: 1\r\n\r\nbody line  \r\n\r\n\r\n")


def records(*ks):
    return {k.name: DNSResult("ok", (k.txt_record(),)) for k in ks}


def dkimpy_verify(message: bytes, key) -> bool:
    txt = key.txt_record().encode()
    return dkim.verify(message, dnsfunc=lambda name, timeout=5: txt)


@pytest.mark.parametrize("which", [0, 1])
def test_signature_verifies_with_dkimpy_and_ours(keypair, which):
    key = keypair[which]
    signed = sign.sign_message(MESSAGE, [key], NOW) + MESSAGE
    assert dkimpy_verify(signed, key)
    sigs = dkimverify.signatures(signed)
    [r] = dkimverify.verify(signed, sigs, records(key))
    assert (r.result, r.domain, r.selector, r.algorithm) == \
        ("pass", "example.com", key.selector, key.sign_algorithm)


def test_both_keys_give_two_signatures_rsa_first(keypair):
    fields = sign.sign_message(MESSAGE, list(keypair), NOW)
    assert fields.count(b"DKIM-Signature:") == 2
    assert fields.index(b"a=rsa-sha256") < fields.index(b"a=ed25519-sha256")
    signed = fields + MESSAGE
    assert [r.result for r in dkimverify.verify(signed, dkimverify.signatures(signed),
                                                records(*keypair))] == ["pass", "pass"]


def test_lf_message_gets_lf_fields_and_verifies_as_crlf(keypair):
    lf = MESSAGE.replace(b"\r\n", b"\n")
    fields = sign.sign_message(lf, [keypair[0]], NOW)
    assert b"\r" not in fields
    assert dkimpy_verify((fields + lf).replace(b"\n", b"\r\n"), keypair[0])


@pytest.mark.parametrize("change", [
    lambda m: m.replace(b"body line", b"body l1ne"),                 # body
    lambda m: m.replace(b"Subject: hello", b"Subject: jello"),       # a signed field
    lambda m: b"From: mallory@example.net\r\n" + m,                  # a second From on top
    lambda m: m.replace(b"\r\n\r\nbody", b"\r\nFrom: m@example.net\r\n\r\nbody"),  # or below
])
def test_altered_in_transit_fails(keypair, change):
    for key in keypair:
        signed = change(sign.sign_message(MESSAGE, [key], NOW) + MESSAGE)
        assert not dkimpy_verify(signed, key)
        [r] = dkimverify.verify(signed, dkimverify.signatures(signed), records(key))
        assert r.result == "fail"


def test_whitespace_changes_survive_relaxed(keypair):
    signed = sign.sign_message(MESSAGE, [keypair[0]], NOW) + MESSAGE
    rewrapped = signed.replace(b"Subject: hello   there", b"Subject:  hello there ") \
        .replace(b"body line  ", b"body   line")
    assert dkimpy_verify(rewrapped, keypair[0])


def test_unsigned_fields_may_be_added(keypair):
    signed = sign.sign_message(MESSAGE, [keypair[0]], NOW) + MESSAGE
    assert dkimpy_verify(b"Received: from x\r\nX-Added: 1\r\n" + signed, keypair[0])


def test_header_list_oversigns_from_and_skips_unrecommended():
    fields, _ = sign.split_message(MESSAGE)
    names = sign.header_list(fields)
    assert names.count(b"from") == 2 and b"x-unsigned" not in names
    assert names[:5] == [b"from", b"to", b"subject", b"date", b"message-id"]


def test_signing_domain_prefers_from_then_envelope():
    fields, _ = sign.split_message(MESSAGE)
    has = {"example.com", "bounce.example.net"}.__contains__
    assert sign.signing_domain(fields, "x@bounce.example.net", has) == "example.com"
    assert sign.signing_domain(fields, "x@bounce.example.net", {"bounce.example.net"}
                               .__contains__) == "bounce.example.net"
    assert sign.signing_domain(fields, "", lambda d: False) is None


def test_verify_results_for_missing_bad_and_temporary_keys(keypair):
    signed = sign.sign_message(MESSAGE, [keypair[0]], NOW) + MESSAGE
    sigs = dkimverify.signatures(signed)
    name = keypair[0].name

    def result(answer):
        return dkimverify.verify(signed, sigs, {name: answer})[0]

    assert result(DNSResult("nxdomain")).result == "permerror"
    assert result(DNSResult("ok", ())).result == "permerror"
    assert result(DNSResult("temperror", reason="timeout")).result == "temperror"
    assert result(DNSResult("ok", ("v=DKIM1; k=rsa; p=notbase64!!",))).result == "permerror"
    assert result(DNSResult("ok", ("garbage",))).result == "permerror"
    other = keypair[1].txt_record().replace("k=ed25519", "k=rsa")
    assert result(DNSResult("ok", (other,))).result == "permerror"


def test_unparsable_signature_is_neutral_and_looks_nothing_up():
    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=x.com\r\n" + MESSAGE
    sigs = dkimverify.signatures(message)
    assert dkimverify.key_names(sigs) == []
    assert dkimverify.verify(message, sigs, {})[0].result == "neutral"


def test_signatures_beyond_the_limit_are_not_evaluated(keypair):
    signed = MESSAGE
    for _ in range(dkimverify.MAX_SIGNATURES + 3):
        signed = sign.sign_message(signed, [keypair[1]], NOW) + signed
    assert len(dkimverify.signatures(signed)) == dkimverify.MAX_SIGNATURES


# --- key files ---------------------------------------------------------------------------------

def test_key_files_modes_and_names(tmp_path):
    old = os.umask(0)
    try:
        key = keys.generate(tmp_path, "Example.COM.", "Sel-1", "ed25519")
    finally:
        os.umask(old)
    assert key.path.name == "sel-1._domainkey.example.com.pem"
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "dkim").st_mode) == 0o700
    assert [p.name for p in (tmp_path / "dkim").iterdir()] == [key.path.name]   # no temp left
    assert keys.check(tmp_path) == []


def test_keygen_never_overwrites(tmp_path):
    key = keys.generate(tmp_path, "example.com", "mail")
    before = key.path.read_bytes()
    with pytest.raises(keys.DKIMKeyError, match="exists already"):
        keys.generate(tmp_path, "example.com", "mail", "ed25519")
    assert key.path.read_bytes() == before


@pytest.mark.parametrize("domain, selector", [("example", "mail"), ("exa mple.com", "mail"),
                                              ("example.com", "a/b"), ("example.com", ""),
                                              ("-x.com", "mail"), ("example.com", "x._domainkey")])
def test_bad_names_refused(tmp_path, domain, selector):
    with pytest.raises(keys.DKIMKeyError):
        keys.generate(tmp_path, domain, selector)


def test_rsa_key_is_2048_bits_and_record_is_publishable(tmp_path):
    key = keys.generate(tmp_path, "example.com", "mail", "rsa")
    assert key.private_key.key_size == 2048
    line = keys.zone_line(key.name, key.txt_record())
    assert line.startswith('mail._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert all(len(chunk) <= 255 for chunk in line.split('"')[1::2])


def test_check_names_bad_files_and_loose_modes(tmp_path):
    keys.generate(tmp_path, "example.com", "mail", "ed25519")
    d = tmp_path / "dkim"
    (d / "junk._domainkey.example.com.pem").write_text("not a key")
    (d / "README").write_text("x")
    (d / "mail._domainkey.example.com.pem").chmod(0o644)
    problems = keys.check(tmp_path)
    assert any("junk._domainkey.example.com.pem: not a PEM private key" in p for p in problems)
    assert any("README: not named" in p for p in problems)
    assert any("mode 0644" in p and "chmod 600" in p for p in problems)


def test_small_rsa_key_refused():
    import shutil
    import subprocess
    if shutil.which("openssl") is None:      # cryptography will not make keys under 1024 bits
        pytest.skip("openssl not installed")
    pem = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                          "rsa_keygen_bits:768"], capture_output=True, check=True).stdout
    with pytest.raises(keys.DKIMKeyError, match="RFC 8301"):
        keys.load_private_key(pem)


def test_registry_sees_new_and_removed_keys_and_reports_problems_once(tmp_path):
    reported = []
    now = [1e12]                  # far from every mtime: no "racy" re-reads
    registry = keys.KeyRegistry(tmp_path, reported.append, clock=lambda: now[0])
    assert registry.keys_for("example.com") == []
    key = keys.generate(tmp_path, "example.com", "mail", "ed25519")
    assert [k.selector for k in registry.keys_for("example.com")] == ["mail"]
    scans = registry.scans
    registry.keys_for("example.com")
    assert registry.scans == scans                   # unchanged directory: one stat, no scan
    (tmp_path / "dkim" / "bad._domainkey.example.com.pem").write_text("junk")
    registry.keys_for("example.com")
    os.utime(tmp_path / "dkim", ns=(1, 2))           # force a visible change
    registry.keys_for("example.com")
    assert len(reported) == 1 and "bad._domainkey" in reported[0]
    key.path.unlink()
    assert registry.keys_for("example.com") == []


def test_registry_rereads_a_directory_changed_too_recently_to_trust(tmp_path):
    keys.generate(tmp_path, "example.com", "mail", "ed25519")
    registry = keys.KeyRegistry(tmp_path, clock=lambda: os.stat(tmp_path / "dkim").st_mtime)
    registry.refresh()
    assert registry.refresh() is True                 # mtime within RACY_SECONDS of "now"


def test_mailappliance_check_names_each_unusable_or_unreadable_key_once(tmp_path):
    from mailappliance import check
    from mailappliance.config import load_settings
    settings = load_settings(None, {"data": str(tmp_path)}, cwd=tmp_path)
    root = check.ServerUser("root", 0, frozenset({0}))
    assert check.check_dkim(settings, root) == []                 # no key directory at all
    good = keys.generate(tmp_path, "example.com", "mail", "ed25519")
    assert check.check_dkim(settings, root) == []
    d = tmp_path / "dkim"
    (d / "junk._domainkey.example.com.pem").write_text("not a key")
    os.symlink("/nonexistent", d / "link._domainkey.example.com.pem")
    lines = check.check_dkim(settings, root)
    assert len(lines) == 2, lines
    assert any(line == f"dkim: unusable key file, not signing with it: "
               f"{d}/junk._domainkey.example.com.pem: not a PEM private key" for line in lines)
    assert f"dkim: {d}/link._domainkey.example.com.pem: No such file or directory" in lines
    # A server running as another user could not read a root-owned 0600 key: that one line,
    # not a second "unusable" line for the same file.
    (d / "junk._domainkey.example.com.pem").unlink()
    (d / "link._domainkey.example.com.pem").unlink()
    os.chown(good.path, 0, 0)
    other = check.ServerUser("nobody", 65534, frozenset({65534}))
    os.chmod(d, 0o755)
    lines = check.check_dkim(settings, other)
    (line,) = [line for line in lines if good.path.name in line]
    assert line.startswith(f"dkim: {good.path} is not readable by nobody (uid 65534)")
    assert lines[-1] == f"dkim: {d}: mode 0755 lets others in; chmod 700"
    # run() includes it.
    assert any(good.path.name in p for p in check.run(settings, "nobody")[1])


def test_mailappliance_check_reads_each_key_file_once(tmp_path, monkeypatch):
    from mailappliance import check
    from mailappliance.config import load_settings
    settings = load_settings(None, {"data": str(tmp_path)}, cwd=tmp_path)
    keys.generate(tmp_path, "example.com", "mail", "ed25519")
    keys.generate(tmp_path, "example.com", "rsa", "rsa")
    reads = []
    real = keys.read_key
    monkeypatch.setattr(keys, "read_key", lambda path: reads.append(path) or real(path))
    assert check.check_dkim(settings, check.ServerUser("root", 0, frozenset({0}))) == []
    assert len(reads) == 2
