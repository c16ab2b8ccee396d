"""CPU per message of the mail-authentication cores, without the server (phase 1 figures; the
end-to-end run with the server signing and verifying is left to the wiring of issue 20).

    python -m benchmarks.mailauth_cpu [--messages 300] [--size 2048]

Prints process CPU milliseconds per message for: signing RSA-2048, Ed25519, both; verifying
the two signatures (dkimpy, keys already fetched); one SPF evaluation with an include (answers
from memory). No DNS, no sockets: this is the CPU the server would spend, nothing else.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mailappliance.mailauth import dkimverify, keys, sign, spf
from mailappliance.mailauth.lookup import DNSResult, run_sync


def per_message_ms(action, count: int) -> float:
    action()
    start = time.process_time()
    for _ in range(count):
        action()
    return (time.process_time() - start) / count * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=2048)
    opts = parser.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="mailauth-bench-"))
    rsa_key = keys.generate(data, "example.com", "mail", "rsa")
    ed_key = keys.generate(data, "example.com", "ed", "ed25519")
    head = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: s\r\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n")
    line = b"x" * 70 + b"\r\n"
    message = head + line * max(1, (opts.size - len(head)) // len(line))
    signed = sign.sign_message(message, [rsa_key, ed_key], 1_700_000_000) + message
    sigs = dkimverify.signatures(signed)
    records = {k.name: DNSResult("ok", (k.txt_record(),)) for k in (rsa_key, ed_key)}
    answers = {("example.com", "TXT"): DNSResult("ok", ("v=spf1 ip4:192.0.2.0/24 "
                                                        "include:_spf.example.com -all",)),
               ("_spf.example.com", "TXT"): DNSResult("ok", ("v=spf1 ip4:198.51.100.0/24 "
                                                             "-all",))}
    n = opts.messages
    rows = [
        ("sign RSA-2048", per_message_ms(lambda: sign.sign_message(message, [rsa_key], 1), n)),
        ("sign Ed25519", per_message_ms(lambda: sign.sign_message(message, [ed_key], 1), n)),
        ("sign both", per_message_ms(lambda: sign.sign_message(message, [rsa_key, ed_key], 1),
                                     n)),
        ("verify both signatures", per_message_ms(
            lambda: dkimverify.verify(signed, sigs, records), n)),
        ("SPF with one include", per_message_ms(
            lambda: run_sync(spf.check("198.51.100.3", "a@example.com", "h.example"),
                             lambda q: answers[(q.name, q.rdtype)]), n)),
    ]
    print(f"{len(message)}-octet message, {n} rounds, process CPU per message:")
    for name, ms in rows:
        print(f"  {name:24s} {ms:6.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
