"""Retention of raw usage events (whole partitions) and the horizon it leaves."""

from __future__ import annotations

from datetime import datetime

import asyncpg

APPLY_RETENTION = "SELECT * FROM apply_retention($1, $2)"
RAW_EVENTS_FROM = "SELECT raw_events_from FROM retention_state WHERE name = 'usage_events'"


async def apply_retention(
    pool: asyncpg.Pool, keep_from: datetime, dry_run: bool
) -> list[asyncpg.Record]:
    """Drop the partitions that end before `keep_from`; return them with their row counts."""
    async with pool.acquire() as conn, conn.transaction():
        return list(await conn.fetch(APPLY_RETENTION, keep_from, dry_run))


async def raw_events_from(pool: asyncpg.Pool) -> datetime | None:
    """The oldest time raw events are still kept from, if retention ever ran."""
    async with pool.acquire() as conn:
        kept: datetime | None = await conn.fetchval(RAW_EVENTS_FROM)
        return kept
