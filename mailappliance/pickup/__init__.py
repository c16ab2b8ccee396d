"""Local injection over a unix socket (`[listen] inject`), Postfix's pickup + postdrop in one:
any local user's `mailappliance-sendmail` hands its message to the server, which records the
caller's uid from the socket's peer credentials. core.py is the wire format, service.py the
Twisted listener."""
