"""The consumer application's own upkeep, on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry

from consumers.app import WRITER_ROLE, keep_partitions_ahead, watch_kafka
from metering.config import Settings
from metering.metrics import DependencyMetrics
from metering.storage.events import EventStore
from tests.conftest import async_wait_for


@pytest.mark.services
async def test_a_running_consumer_creates_next_months_partitions(
    migrated_database: str, db: asyncpg.Connection
) -> None:
    """Partitions are made ahead while the consumer runs, not only when it starts, with the
    consumer's least privileges: the partition two months ahead is dropped, and the
    running keeper makes it again without a restart."""
    ahead = await db.fetchval(
        "SELECT format('usage_events_%s', to_char(now() + interval '2 months', 'YYYY_MM'))"
    )
    await db.execute(f"DROP TABLE IF EXISTS {ahead}")  # empty: it lies in the future

    async def as_the_writer(conn: asyncpg.Connection) -> None:
        await conn.execute(f"SET ROLE {WRITER_ROLE}")  # the consumer's own privileges

    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=1, init=as_the_writer)
    assert pool is not None
    keeper = asyncio.create_task(keep_partitions_ahead(EventStore(pool), 0.05))
    try:
        await async_wait_for(
            lambda: pool.fetchval("SELECT to_regclass($1) IS NOT NULL", ahead),
            10,
            "the partition two months ahead",
        )
        attached = await pool.fetchval(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'usage_events'::regclass AND c.relname = $1",
            ahead,
        )
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await pool.close()
    assert attached == 1


async def test_watch_kafka_reports_an_outage_and_the_return(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe fails twice (the broker is away), then answers: the gauge goes to 0 and
    back to 1, each failure is a counted retry, and the log says both."""
    registry = CollectorRegistry()
    metrics = DependencyMetrics(registry)
    answers: list[BaseException | None] = [KafkaConnectionError("gone"), TimeoutError(), None]
    probed = asyncio.Event()
    seen_down: list[float | None] = []

    async def probe() -> None:
        seen_down.append(
            registry.get_sample_value("metering_dependency_up", {"dependency": "kafka"})
        )
        answer = answers.pop(0) if answers else None
        if not answers:
            probed.set()
        if answer is not None:
            raise answer

    fast = base_settings.model_copy(update={"retry_min_seconds": 0.01, "retry_max_seconds": 0.02})
    caplog.set_level(logging.WARNING, logger="metering.retry")
    watcher = asyncio.create_task(watch_kafka(probe, fast, metrics, every_seconds=0.01))
    try:
        await asyncio.wait_for(probed.wait(), 5)
        await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert seen_down[:3] == [None, 0.0, 0.0]  # down from the first failure until it answers
    assert registry.get_sample_value("metering_dependency_up", {"dependency": "kafka"}) == 1.0
    retries = {"dependency": "kafka"}
    assert registry.get_sample_value("metering_dependency_retries_total", retries) == 2.0
    assert "kafka unavailable" in caplog.text and "kafka is back after 2 retries" in caplog.text
