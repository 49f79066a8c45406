"""How long to wait before trying again: the one exponential backoff of every retry (a job's delay queue, an ESI
call, a reconnect, a child's restart, a webhook's delivery) and the one reader of a header that says how long to
wait (Retry-After, ESI's error-limit reset, Discord's retry_after). Pure functions: the caller passes the random
source, and adds the jitter its retry needs.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

MAX_PAUSE = 900.0   # the longest pause any header may ask for: ESI's own window is 15 minutes
_MAX_DOUBLINGS = 64  # beyond any cap: a long streak of failures must not overflow the float


def exponential(step: int, *, base: float, cap: float = math.inf) -> float:
    """Seconds before try number `step` + 1: base after the first failure (step 1), doubled for each further
    one, at most cap."""
    return min(cap, base * 2 ** min(step - 1, _MAX_DOUBLINGS))


def pause_seconds(value: str | None, default: float, *, header: str) -> float:
    """A header's seconds to wait, from 0 to MAX_PAUSE; the default when absent, unreadable or not finite."""
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        log.warning("ignoring an unreadable %s header: %r", header, value[:40])
        return default
    return min(max(0.0, seconds), MAX_PAUSE)
