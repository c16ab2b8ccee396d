"""Every SMTP reply text the server sends, in one table.

Texts are qmail-smtpd's where qmail had one (quoted exactly, including its ``(#x.y.z)`` suffix),
so operators, logs and tests can match them. `Reply.enhanced` is the RFC 3463 code; it is sent
after the reply code only once the client said EHLO and we advertised ENHANCEDSTATUSCODES
(RFC 2034 section 3), so a HELO client sees qmail's exact line.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailappliance.access.relay_policy import Verdict


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    text: str                 # "\n" separates the lines of a multi-line reply

    @property
    def closes(self) -> bool:
        """RFC 5321 section 3.8: 421 means the server closes the transmission channel."""
        return self.code == 421

    def render(self, enhanced: bool = False) -> bytes:
        key = (self, enhanced)
        cached = _RENDERED.get(key)
        if cached is not None:
            return cached
        code = str(self.code)
        prefix = f" {self.enhanced}" if enhanced and self.enhanced else ""
        lines = self.text.split("\n")
        out = [f"{code}-{prefix[1:] + ' ' if prefix else ''}{line}\r\n" for line in lines[:-1]]
        out.append(f"{code}{prefix} {lines[-1]}\r\n")
        data = "".join(out).encode("ascii", "replace")
        if len(_RENDERED) < _RENDER_CACHE_MAX:
            _RENDERED[key] = data
        return data


# Rendered bytes of the replies seen so far: the table below is small and constant, so steady
# state hits the cache. Capped so replies with variable text (queue ids) cannot grow it forever.
_RENDER_CACHE_MAX = 512
_RENDERED: dict[tuple[Reply, bool], bytes] = {}


# --- connection -------------------------------------------------------------------------------

def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP")                   # qmail: "220 me ESMTP"


def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", hostname)                            # qmail: "221 me"


def helo(hostname: str) -> Reply:
    return Reply(250, None, hostname)                               # qmail: "250 me"


def ehlo(hostname: str, keywords: list[str]) -> Reply:
    return Reply(250, None, "\n".join([hostname, *keywords]))


TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "sorry, too many connections, try again later (#4.3.2)")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "sorry, too many connections from your address (#4.7.0)")
# descriptors.py: this listener's share of the process's open files is taken.
OUT_OF_DESCRIPTORS = Reply(421, "4.3.2", "sorry, the server is out of connection slots, try "
                                         "again later (#4.3.2)")
SHUTTING_DOWN = Reply(421, "4.3.2", "sorry, the server is shutting down (#4.3.2)")
TIMEOUT = Reply(451, "4.4.2", "timeout (#4.4.2)")                              # qmail exact
PREGREET = Reply(554, "5.5.1", "sorry, you talked before my greeting (#5.5.1)")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "sorry, too many errors, closing connection (#4.7.0)")

# --- command line hygiene ---------------------------------------------------------------------

LINE_TOO_LONG = Reply(500, "5.5.2", "sorry, command line too long (#5.5.2)")
LINE_FLOOD = Reply(421, "4.7.0", "sorry, no line end in sight, closing connection (#4.7.0)")
NUL_IN_COMMAND = Reply(501, "5.5.2", "sorry, NUL in command (#5.5.2)")
BARE_CR_IN_COMMAND = Reply(501, "5.5.2", "sorry, bare CR in command (#5.5.2)")
BARE_LF_IN_COMMAND = Reply(501, "5.5.2", "sorry, commands end in CRLF, not bare LF (#5.5.2)")
HTTP_REQUEST = Reply(502, "5.5.1", "sorry, this is an SMTP server, not a web server (#5.5.1)")
UNIMPLEMENTED = Reply(502, "5.5.1", "unimplemented (#5.5.1)")                  # qmail exact
SYNTAX_ERROR = Reply(555, "5.5.4", "syntax error (#5.5.4)")                   # qmail exact
NO_ARGUMENTS = Reply(501, "5.5.4", "sorry, this command takes no arguments (#5.5.4)")
HELO_NEEDS_NAME = Reply(501, "5.5.4", "sorry, HELO and EHLO need a host name (#5.5.4)")

# --- simple commands --------------------------------------------------------------------------

OK = Reply(250, "2.0.0", "ok")                                                 # qmail: NOOP
RESET = Reply(250, "2.0.0", "flushed")                                         # qmail: RSET
VRFY = Reply(252, "2.0.0", "send some mail, i'll try my best")                 # qmail exact
EXPN = UNIMPLEMENTED                                                           # qmail: no EXPN
HELP = Reply(214, "2.0.0", "mailappliance: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")

# --- transaction ------------------------------------------------------------------------------

MAIL_OK = Reply(250, "2.1.0", "ok")                                            # qmail: "250 ok"
RCPT_OK = Reply(250, "2.1.5", "ok")
NESTED_MAIL = Reply(503, "5.5.1", "nested MAIL command (#5.5.1)")             # qmail exact
MAIL_FIRST = Reply(503, "5.5.1", "MAIL first (#5.5.1)")                       # qmail exact
RCPT_FIRST = Reply(503, "5.5.1", "RCPT first (#5.5.1)")                       # qmail exact
ADDRESS_TOO_LONG = Reply(553, "5.1.3", "sorry, that address is too long (#5.1.3)")
BAD_PARAMETER = Reply(555, "5.5.4", "sorry, unsupported MAIL or RCPT parameter (#5.5.4)")
SIZE_EXCEEDED = Reply(552, "5.3.4",
                      "sorry, that message size exceeds my databytes limit (#5.3.4)")  # qmail
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "sorry, too many recipients (#4.5.3)")
NOT_IN_RCPTHOSTS = Reply(553, "5.7.1",
                         "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
NO_MAILBOX = Reply(550, "5.1.1", "sorry, no mailbox here by that name (#5.1.1)")  # qmail bounce
BAD_LOCAL_PART = Reply(550, "5.1.1",
                       "sorry, no mailbox here by that name; no routing in local parts (#5.1.1)")
LOOKUP_FAILED = Reply(451, "4.3.0", "sorry, temporary failure looking up the recipient (#4.3.0)")
START_DATA = Reply(354, None, "go ahead")                                      # qmail exact
QQ_WRITE_ERROR = Reply(451, "4.3.0", "qq write error or disk full (#4.3.0)")  # qmail exact
QQ_TEMPORARY = Reply(451, "4.3.0", "qq temporary problem (#4.3.0)")            # qmail exact
TOO_MANY_HOPS = Reply(554, "5.4.6", "too many hops, this message is looping (#5.4.6)")  # qmail
BARE_LF_IN_DATA = Reply(451, "4.6.0", "See http://pobox.com/~djb/docs/smtplf.html.")  # qmail
BARE_CR_IN_DATA = Reply(451, "4.6.0", "sorry, bare CR in message; lines end in CRLF (#4.6.0)")


# The relay policy's verdict (access/relay_policy.py) as the reply to RCPT.
RCPT_VERDICT_REPLIES: dict[Verdict, Reply] = {
    Verdict.LOCAL: RCPT_OK,
    Verdict.ALIAS: RCPT_OK,
    Verdict.RELAY: RCPT_OK,
    Verdict.NO_RELAY: NOT_IN_RCPTHOSTS,
    Verdict.NO_MAILBOX: NO_MAILBOX,
    Verdict.ROUTING_LOCAL_PART: BAD_LOCAL_PART,
}


def rcpt_reply(verdict: Verdict) -> Reply:
    """What RCPT gets for the relay policy's verdict (qmail's texts)."""
    return RCPT_VERDICT_REPLIES[verdict]


def queued(when: int, qid: str) -> Reply:
    """qmail: "250 ok <time> qp <pid>"; our queue id stands where qmail-queue's pid stood."""
    return Reply(250, "2.0.0", f"ok {when} qp {qid}")


# --- STARTTLS (RFC 3207) and AUTH (RFC 4954): used once those are offered ----------------------

TLS_READY = Reply(220, "2.0.0", "ready to start TLS")
TLS_ALREADY = Reply(503, "5.5.1", "sorry, TLS is already active (#5.5.1)")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "sorry, TLS not available (#4.7.0)")
AUTH_OK = Reply(235, "2.7.0", "ok, go ahead (#2.0.0)")                         # qmail-smtpd-auth
AUTH_FAILED = Reply(535, "5.7.8", "authorization failed (#5.7.0)")             # qmail-smtpd-auth
AUTH_CANCELLED = Reply(501, "5.0.0", "auth exchange cancelled (#5.0.0)")       # qmail-smtpd-auth
AUTH_ALREADY = Reply(503, "5.5.1", "you're already authenticated (#5.5.0)")    # qmail-smtpd-auth
AUTH_NOT_IN_TRANSACTION = Reply(503, "5.5.1", "sorry, no AUTH during a mail transaction (#5.5.1)")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "auth type unimplemented (#5.5.1)")  # qmail-smtpd-auth
AUTH_MALFORMED = Reply(501, "5.5.2", "malformed auth input (#5.5.4)")          # qmail-smtpd-auth
AUTH_TEMPORARY = Reply(454, "4.7.0", "temporary authentication failure (#4.3.0)")  # RFC 4954 s6
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0",
                               "sorry, too many authentication failures, closing connection"
                               " (#4.7.0)")
# RFC 4954 section 6: 538 when the mechanism needs an encrypted session; we never take a
# password in clear (unless [submission] auth_plaintext_loopback allows it for loopback).
AUTH_NEEDS_TLS = Reply(538, "5.7.11",
                       "sorry, encryption required for authentication; say STARTTLS first"
                       " (#5.7.11)")
# RFC 6409 section 4.3: the submission port refuses MAIL from a session that neither
# authenticated nor is trusted otherwise (RELAYCLIENT, POP-before-SMTP).
AUTH_REQUIRED = Reply(530, "5.7.0", "sorry, authentication required (#5.7.0)")
AUTH_REQUIRED_STARTTLS = Reply(530, "5.7.0",
                               "sorry, authentication required; say STARTTLS, then AUTH"
                               " (#5.7.0)")                                      # RFC 3207 s4
# Sender binding (smtp/binding.py): the user may send as their address and its aliases only.
SENDER_LOOKUP_FAILED = Reply(451, "4.3.0",
                             "sorry, temporary failure looking up your addresses (#4.3.0)")
FROM_HEADER_UNREADABLE = Reply(553, "5.7.1",
                               "sorry, I cannot read the From: header of your message; it"
                               " must name your address (#5.7.1)")


def sender_not_yours(user: str) -> Reply:
    """MAIL FROM names somebody else; `user` is the login (our own, safe to echo)."""
    return Reply(553, "5.7.1", f"sorry, that sender address is not yours; you are logged in as"
                               f" {user}, use it or one of its aliases (#5.7.1)")


def from_header_not_yours(user: str) -> Reply:
    return Reply(553, "5.7.1", f"sorry, the From: header names an address that is not yours;"
                               f" you are logged in as {user}, use it or one of its aliases"
                               f" (#5.7.1)")


def dnsbl_refusal(permanent: bool, text: str) -> Reply:
    """rblsmtpd: 451 (or 553 with -b / RBLSMTPD="-text") with the list's reason."""
    if permanent:
        return Reply(553, "5.7.1", text)
    return Reply(451, "4.7.1", text)


# --- content scanning (mailappliance/scan; DESIGN.md "Scanning"), after the final dot ----------

SCAN_TEMPORARY = Reply(451, "4.3.0", "sorry, the content scanner is unavailable, try again later"
                                     " (#4.3.0)")


def virus_found(signature: str) -> Reply:
    """`signature` is clamd's name, already cut to safe characters (scan/clamd.py clean_name)."""
    return Reply(554, "5.7.0", f"sorry, your message contains a virus ({signature}); it was not"
                               f" accepted (#5.7.0)")


def spam_refused(score: float, reject: float) -> Reply:
    return Reply(550, "5.7.1", f"sorry, your message looks like spam (score {score:.1f}, limit"
                               f" {reject:.1f}); it was not accepted (#5.7.1)")
