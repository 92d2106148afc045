"""The consumer application's own upkeep, on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import date

import asyncpg
import pytest

from consumers.app import WRITER_ROLE, keep_partitions_ahead
from metering.storage.events import EventStore
from tests.conftest import async_wait_for

pytestmark = pytest.mark.services


async def test_a_running_consumer_creates_next_months_partitions(
    migrated_database: str,
) -> None:
    """Partitions are made ahead while the consumer runs, not only when it starts, with the
    consumer's least privileges: here 'today' jumps to 2040, and 2040's partitions appear
    without a restart."""

    async def as_the_writer(conn: asyncpg.Connection) -> None:
        await conn.execute(f"SET ROLE {WRITER_ROLE}")  # the consumer's own privileges

    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=1, init=as_the_writer)
    assert pool is not None
    keeper = asyncio.create_task(
        keep_partitions_ahead(EventStore(pool), 0.05, lambda: date(2040, 6, 15))
    )
    try:
        await async_wait_for(
            lambda: pool.fetchval("SELECT to_regclass('usage_events_2040_08') IS NOT NULL"),
            10,
            "the partition two months ahead of 2040-06",
        )
        months = await pool.fetchval(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'usage_events'::regclass AND c.relname LIKE 'usage_events_2040_%'"
        )
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await pool.close()
    assert months == 5  # April to August 2040, each attached to usage_events
