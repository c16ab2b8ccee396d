"""twistd glue: command-line options -> Settings -> the service tree. Nothing else."""

from __future__ import annotations

import sys

from twisted.python import usage

from mailappliance.config import ConfigError, load_settings


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the mailappliance mail host: SMTP, submission, POP3 and the admin "
                "protocol. Without --config it runs on embedded defaults in ./var.")
    optParameters = [
        ["config", "c", None, "TOML configuration file"],
        ["data", "d", None, "state directory: queue, mailboxes, user store, logs"],
        ["hostname", None, None, "greeting and Received: name (qmail's me)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.endpoints: dict[str, list[str]] = {}

    def _add_endpoint(self, kind: str, value: str) -> None:
        self.endpoints.setdefault(kind, []).append(value)

    def opt_smtp(self, value: str) -> None:
        """SMTP endpoint (Twisted endpoint string; repeatable)"""
        self._add_endpoint("smtp", value)

    def opt_submission(self, value: str) -> None:
        """submission endpoint (repeatable)"""
        self._add_endpoint("submission", value)

    def opt_submissions(self, value: str) -> None:
        """implicit-TLS submission endpoint, port 465 (repeatable)"""
        self._add_endpoint("submissions", value)

    def opt_pop3(self, value: str) -> None:
        """POP3 endpoint (repeatable)"""
        self._add_endpoint("pop3", value)

    def opt_pop3s(self, value: str) -> None:
        """POP3 over implicit TLS endpoint (repeatable)"""
        self._add_endpoint("pop3s", value)

    def opt_admin(self, value: str) -> None:
        """admin protocol endpoint (repeatable)"""
        self._add_endpoint("admin", value)

    def opt_metrics(self, value: str) -> None:
        """Prometheus /metrics endpoint (repeatable; loopback only unless allowed)"""
        self._add_endpoint("metrics", value)

    def overrides(self) -> dict:
        out: dict = {}
        if self["data"]:
            out["data"] = self["data"]
        if self["hostname"]:
            out["hostname"] = self["hostname"]
        for kind, values in self.endpoints.items():
            out[f"listen.{kind}"] = list(values)
        return out

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self["config"], self.overrides())
        except ConfigError as e:
            # One clear line and a non-zero exit; no usage text, no traceback.
            sys.stderr.write(f"mailappliance: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1)


def makeService(options: Options):
    # Imported here: the options (and `twistd mailappliance --help`) need none of the tree.
    # A start-up that cannot work ends in one line and exit status 1 (mailappliance.startup);
    # twistd's own options (--uid, --gid, --pidfile) are the parent of ours.
    from mailappliance.service import make_service
    from mailappliance.startup import build_or_exit
    return build_or_exit(options.settings, make_service, getattr(options, "parent", None))
