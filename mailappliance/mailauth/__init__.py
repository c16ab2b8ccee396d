"""Mail authentication: DKIM signing of outbound mail; SPF, DKIM and DMARC checks of inbound mail.

    message.py     header fields of a message (pure)
    canon.py       DKIM relaxed canonicalisation, byte for byte dkimpy's (pure)
    keys.py        DKIM keys under data/dkim/: generation, TXT records, the registry (store)
    sign.py        DKIM signing (pure; OpenSSL through `cryptography`)
    lookup.py      the DNS questions the pure checks yield, and their answers
    spf.py         RFC 7208 check_host() (pure generator)
    dkimverify.py  DKIM verification (a fast path through OpenSSL, else dkimpy), key records
                   prefetched by us
    dmarc.py       RFC 7489 discovery, alignment, policy (pure; Public Suffix List bundled)
    results.py     Authentication-Results (RFC 8601), forged-header removal, the verdict
    service.py     Verifier and Signer: the Twisted adapters the SMTP side calls
    command.py     `mailappliance dkim keygen|list`

docs/MAILAUTH.md explains the behaviour.
"""
