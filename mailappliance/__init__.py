"""mailappliance: qmail + vpopmail + ucspi-tcp + daemontools as one Twisted process."""

__version__ = "0.1.0"
