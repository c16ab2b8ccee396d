"""Moved to mailappliance/access/penalty.py (shared with SMTP AUTH); kept for old imports."""

from mailappliance.access.penalty import (  # noqa: F401
    IPV6_MASK_BITS, MAX_TRACKED, PENALTY_INIT, PENALTY_MAX, PENALTY_MAX_STEPS, PENALTY_TIMEOUT,
    LoginPenalty, penalty_key, penalty_seconds)
