"""Deliverers (qmail-local, qmail-remote) and the Maildir writer.

A delivery attempt ends in one `Result` per recipient, in qmail's three kinds: success (mark
done), deferral (retry on the schedule) and failure (bounce).
"""

from __future__ import annotations

from dataclasses import dataclass

SUCCESS, DEFERRAL, FAILURE = "success", "deferral", "failure"


@dataclass(frozen=True)
class Result:
    status: str      # SUCCESS | DEFERRAL | FAILURE
    text: str        # the report: qmail-local/qmail-remote wording, may span lines

    def __post_init__(self) -> None:
        if self.status not in (SUCCESS, DEFERRAL, FAILURE):
            raise ValueError(f"bad delivery status {self.status!r}")


def success(text: str) -> Result:
    return Result(SUCCESS, text)


def deferral(text: str) -> Result:
    return Result(DEFERRAL, text)


def failure(text: str) -> Result:
    return Result(FAILURE, text)
