"""Retention of raw usage events (whole partitions) and the horizon it leaves."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from metering.errors import RetentionTooShort
from metering.models import MAX_ACCEPTANCE_DELAY

APPLY_RETENTION = "SELECT * FROM apply_retention($1, $2)"
RAW_EVENTS_FROM = "SELECT raw_events_from FROM retention_state WHERE name = 'usage_events'"


async def apply_retention(
    pool: asyncpg.Pool,
    keep_from: datetime,
    dry_run: bool,
    *,
    now: datetime,
    lateness_window: timedelta,
) -> list[asyncpg.Record]:
    """Drop the partitions that end before `keep_from`; return them with their row counts.

    Raises RetentionTooShort, before touching anything, when `keep_from` is later than
    `now - lateness_window - MAX_ACCEPTANCE_DELAY`: the dedupe keys of events that can still
    arrive again (and be accepted, judged at the time Kafka took them) must outlive them, or
    exactly-once would end at the horizon.
    """
    earliest_allowed = now - lateness_window - MAX_ACCEPTANCE_DELAY
    if keep_from > earliest_allowed:
        raise RetentionTooShort(
            keep_from,
            earliest_allowed,
            f"raw events from {keep_from:%Y-%m-%d} on would be dropped, but events back to "
            f"{earliest_allowed:%Y-%m-%d %H:%M} UTC are still accepted (lateness window "
            f"{lateness_window.days} days, judged when Kafka took them, up to "
            f"{MAX_ACCEPTANCE_DELAY.days} day before they are read): a re-sent copy of a "
            f"dropped event would be stored and counted twice. Keep more than "
            f"{(lateness_window + MAX_ACCEPTANCE_DELAY).days} days of raw events.",
        )
    async with pool.acquire() as conn, conn.transaction():
        return list(await conn.fetch(APPLY_RETENTION, keep_from, dry_run))


async def raw_events_from(pool: asyncpg.Pool) -> datetime | None:
    """The oldest time raw events are still kept from, if retention ever ran."""
    async with pool.acquire() as conn:
        kept: datetime | None = await conn.fetchval(RAW_EVENTS_FROM)
        return kept
