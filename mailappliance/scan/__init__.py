"""Content scanning before the 250 (the seed's qmail-scanner), DESIGN.md `[scan]`.

After the final dot and before the queue commit, the SMTP session runs the end-of-DATA checks
(enddata.py); `service.ScanCheck` is the scanning one. It hands the message to
`policy.Scanning.check()`, which asks the virus scanner (clamd, INSTREAM) and the spam scorer
(rspamd, /checkv2) at the same time and answers one typed `verdict.Verdict`: accept (with the
headers to add), refuse as a virus (554 5.7.0), refuse as spam (550 5.7.1), tempfail (451 4.3.0),
or accept unscanned (on_error = "accept", or a message over max_bytes).

Layout, each protocol's sans-IO core beside the thin Twisted adapter:

    interfaces.py   results (VirusReport, SpamReport, ScanFailure), ScanEnvelope,
                    IVirusScanner, ISpamScorer
    clamd.py        clamd's INSTREAM/PING framing and reply parsing (no sockets)
    rspamd.py       rspamd's HTTP /checkv2 request and response parsing (no sockets)
    verdict.py      the decision table, verdict headers, scanner health (pure)
    client.py       ClamdScanner, RspamdScorer: Twisted clients over an endpoint string
    policy.py       Scanning: runs both, applies max_bytes/trust/on_error, logs outages once
    service.py      ScanCheck: the end-of-DATA check around Scanning; Verdict -> reply

docs/SCANNING.md is the operator's page.
"""
