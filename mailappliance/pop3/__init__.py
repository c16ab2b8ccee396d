"""POP3 (qmail-popup + vchkpw + qmail-pop3d): core.py, mailbox.py, penalty.py, protocol.py, service.py."""
