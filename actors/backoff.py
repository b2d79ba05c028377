"""Exponential backoff: the one place that computes how long to wait before trying again.

Used by the feed (reconnects, with full jitter), the supervisor (restarts) and the engine
(retries of a failed close). Pure functions; the caller owns the attempt count and the clock.
"""

from __future__ import annotations

import random

# 2**60 times any sane base is past every cap; bounding the exponent keeps the float finite.
_MAX_EXPONENT = 60


def exponential(attempt: int, base: float, cap: float) -> float:
    """``base * 2**attempt`` seconds, at most ``cap``; ``attempt`` counts from 0."""
    return float(min(cap, base * 2 ** min(max(attempt, 0), _MAX_EXPONENT)))


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Uniform in ``0 .. exponential(attempt, base, cap)`` ("full jitter": many clients that
    lost the same server do not come back in step)."""
    return rng.uniform(0, exponential(attempt, base, cap))
