"""Fixtures for aggregation tests on the real PostgreSQL.

Each test's database state is isolated by organization ids; the aggregator watermark is
shared, which is fine: a pass aggregates whatever is new, for every organization.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from aggregator.backfill import Backfiller
from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from metering.config import Settings
from metering.metrics import AggregatorMetrics
from metering.models import EventType, UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.conftest import ROOT, free_port


@pytest.fixture
async def pool(migrated_database: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(migrated_database, min_size=1, max_size=4)
    assert created is not None
    yield created
    await created.close()


@pytest.fixture
def event_store(pool: asyncpg.Pool) -> EventStore:
    return EventStore(pool)


@pytest.fixture
def aggregate_store(pool: asyncpg.Pool) -> AggregateStore:
    return AggregateStore(pool)


@pytest.fixture
def aggregator(settings: Settings, aggregate_store: AggregateStore) -> Aggregator:
    """An aggregator that does not publish (tests of publishing build their own), whose
    backfills read 5 events a chunk (many chunks, passes between them)."""
    return Aggregator(
        settings,
        aggregate_store,
        None,
        AggregatorMetrics(CollectorRegistry()),
        backfiller=Backfiller(aggregate_store.pool, chunk_events=5),
    )


class Events:
    """Builds and stores events for one organization."""

    def __init__(self, store: EventStore, org_id: uuid.UUID) -> None:
        self.store = store
        self.org_id = org_id
        self.count = 0

    async def add(
        self,
        event_type: str,
        at: str,
        quantity: int | str = 1,
        user: uuid.UUID | None = None,
        event_id: str | None = None,
    ) -> None:
        self.count += 1
        event = UsageEvent(
            id=event_id or f"e{self.count}",
            type=EventType(event_type),
            org_id=self.org_id,
            user_id=user,
            quantity=Decimal(quantity),
            occurred_at=datetime.fromisoformat(at),
        )
        await self.store.write_batch([IncomingEvent(event)])


async def subscribe(
    db: asyncpg.Connection, org_id: uuid.UUID, plan: str = "free", timezone: str = "UTC"
) -> None:
    await db.execute(
        "INSERT INTO org_subscriptions (org_id, plan, timezone) VALUES ($1, $2, $3) "
        "ON CONFLICT (org_id) DO UPDATE SET plan = $2, timezone = $3",
        org_id,
        plan,
        timezone,
    )


async def aggregates(
    db: asyncpg.Connection, org_id: uuid.UUID
) -> dict[tuple[str, str, str], tuple[str, int]]:
    rows = await db.fetch(
        "SELECT event_type, period, period_start, value, event_count FROM usage_aggregations "
        "WHERE org_id = $1",
        org_id,
    )
    return {
        (r["event_type"], r["period"], r["period_start"].isoformat()): (
            format(r["value"].normalize(), "f"),
            r["event_count"],
        )
        for r in rows
    }


async def says(log: Path, text: str) -> bool:
    return text in await asyncio.to_thread(log.read_text)


def aggregate_process(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "metering", "aggregate", "--metrics-port", str(free_port())],
        env=settings.child_environment(),
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
