"""SMTP: the sans-IO server core (core.py), its reply table (replies.py), the Twisted protocol
(protocol.py) and the factory builder the service tree calls (service.py)."""
