"""The twistd plugin: `twistd mailappliance`. Options and the service tree live in mailappliance.tap."""

from twisted.application.service import ServiceMaker

mailappliance = ServiceMaker(
    "mailappliance",
    "mailappliance.tap",
    "qmail-style mail host: SMTP, submission, POP3, queue and admin in one process",
    "mailappliance",
)
