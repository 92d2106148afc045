"""When a failed delivery is tried again (contract section 9): exponential back-off with
jitter, for at least 24 hours after the first attempt, then the message is marked failed.
Pure functions of the attempt count, the clock and a random source, so tests can run the
schedule on a clock of their own."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

# the delay after the n-th failed attempt (the last one repeats), before jitter
DELAYS = (
    timedelta(seconds=5),
    timedelta(seconds=30),
    timedelta(minutes=2),
    timedelta(minutes=10),
    timedelta(minutes=30),
    timedelta(hours=1),
    timedelta(hours=2),
    timedelta(hours=4),
    timedelta(hours=8),
)
JITTER = 0.2  # each delay is drawn from [d * (1 - JITTER), d * (1 + JITTER)]
RETRY_FOR = timedelta(hours=24)


def retry_delay(failed_attempts: int, rng: random.Random) -> timedelta:
    """The wait after the `failed_attempts`-th failure (1 for the first)."""
    base = DELAYS[min(failed_attempts, len(DELAYS)) - 1]
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


def after_failure(
    failed_attempts: int, first_attempt_at: datetime, now: datetime, rng: random.Random
) -> datetime | None:
    """When to try again after a failure at `now`, or None: give up (marked failed), once
    RETRY_FOR has passed since the first attempt."""
    if now - first_attempt_at >= RETRY_FOR:
        return None
    return now + retry_delay(failed_attempts, rng)
