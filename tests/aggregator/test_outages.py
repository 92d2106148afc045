"""`metering aggregate` through a PostgreSQL crash and restart, on the real database: it
loses the lead with its lock session, waits, leads again, and nothing is counted twice."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from metering.config import Settings
from metering.devenv.services import DevServices
from metering.storage.events import EventStore
from tests.aggregator.conftest import Events, aggregate_process, says, subscribe
from tests.conftest import async_wait_for

pytestmark = pytest.mark.services


async def api_calls_used(dsn: str, org: uuid.UUID) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        raw = await conn.fetchval(
            "SELECT check_feature_access(NULL, 'max_api_calls_per_month', $1)", org
        )
        return json.loads(raw)["used"]
    finally:
        await conn.close()


async def add_api_calls(dsn: str, org: uuid.UUID, quantity: int, event_id: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        events = Events(EventStore(pool), org)
        await events.add("api_call", datetime.now(UTC).isoformat(), quantity, event_id=event_id)
    finally:
        await pool.close()


async def test_aggregator_leads_again_after_postgres_restarts(
    settings: Settings, migrated_database: str, dev_services: DevServices, tmp_path: Path
) -> None:
    org = uuid.uuid4()
    conn = await asyncpg.connect(migrated_database)
    try:
        await subscribe(conn, org, "free")
    finally:
        await conn.close()
    log = tmp_path / "aggregate.log"
    aggregator = aggregate_process(settings, log)
    try:
        await async_wait_for(lambda: says(log, "leading"), 30, "the aggregator to lead")
        await add_api_calls(migrated_database, org, 100, "before")

        async def used(value: int) -> bool:
            return await api_calls_used(migrated_database, org) == value

        await async_wait_for(lambda: used(100), 30, "the first event aggregated")
        await asyncio.to_thread(dev_services.stop_postgres, mode="immediate")
        await asyncio.sleep(2)
        await asyncio.to_thread(dev_services.start_postgres)
        await add_api_calls(migrated_database, org, 50, "after")
        await async_wait_for(lambda: used(150), 60, "the event stored after the restart")
        await asyncio.sleep(1)  # a pass run twice would show now
        assert await used(150)
        assert aggregator.poll() is None, "the aggregator must survive the outage"
        text = log.read_text()
        assert "standing by" in text  # it lost the lead with its lock session
        assert text.count("leading: aggregating") == 2, text[-3000:]
        assert "Traceback" not in text, text[-3000:]  # an outage logs one line per retry
    finally:
        aggregator.terminate()
        aggregator.wait(timeout=30)
