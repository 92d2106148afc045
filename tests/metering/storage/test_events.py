"""write_batch on the real PostgreSQL: one row per (org_id, id), ever."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from metering.models import EventType, UsageEvent
from metering.storage.events import EventStore, IncomingEvent

pytestmark = pytest.mark.services


def make(org: uuid.UUID, event_id: str, when: datetime, quantity: int = 1) -> IncomingEvent:
    return IncomingEvent(
        UsageEvent(
            id=event_id,
            type=EventType.API_CALL,
            org_id=org,
            quantity=Decimal(quantity),
            occurred_at=when,
        )
    )


@pytest.fixture
async def store(migrated_database: str) -> AsyncIterator[EventStore]:
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    assert pool is not None
    yield EventStore(pool)
    await pool.close()


async def test_duplicates_in_batch_across_batches_and_months_are_stored_once(
    store: EventStore, db: asyncpg.Connection
) -> None:
    org = uuid.uuid4()
    now = datetime.now(UTC)
    first = await store.write_batch(
        [make(org, "a", now), make(org, "b", now), make(org, "a", now, 9)]
    )
    assert (first.stored, first.duplicates) == (2, 1)
    # The same id days later with a different time, in another month's partition, and
    # a different quantity: still the same event, counted once.
    later = await store.write_batch(
        [make(org, "a", now - timedelta(days=33), 5), make(org, "c", now)]
    )
    assert (later.stored, later.duplicates) == (1, 1)
    rows = await db.fetch(
        "SELECT event_id, quantity FROM usage_events WHERE org_id = $1 ORDER BY event_id", org
    )
    assert [(r["event_id"], r["quantity"]) for r in rows] == [("a", 1), ("b", 1), ("c", 1)]


async def test_same_id_in_two_orgs_is_two_events(store: EventStore, db: asyncpg.Connection) -> None:
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    result = await store.write_batch([make(org_a, "shared", now), make(org_b, "shared", now)])
    assert result.stored == 2


async def test_first_seen_org_gets_the_free_plan(store: EventStore, db: asyncpg.Connection) -> None:
    org = uuid.uuid4()
    await store.write_batch([make(org, "x", datetime.now(UTC))])
    row = await db.fetchrow(
        "SELECT plan, status, timezone FROM org_subscriptions WHERE org_id = $1", org
    )
    assert row is not None and (row["plan"], row["status"], row["timezone"]) == (
        "free",
        "active",
        "UTC",
    )


async def test_existing_subscription_is_left_alone(
    store: EventStore, db: asyncpg.Connection
) -> None:
    org = uuid.uuid4()
    await db.execute("INSERT INTO org_subscriptions (org_id, plan) VALUES ($1, 'pro')", org)
    await store.write_batch([make(org, "x", datetime.now(UTC))])
    assert await db.fetchval("SELECT plan FROM org_subscriptions WHERE org_id = $1", org) == "pro"


async def test_event_outside_partitions_lands_in_default_and_moves_on_partition_creation(
    store: EventStore, db: asyncpg.Connection
) -> None:
    org = uuid.uuid4()
    far = datetime(2031, 6, 15, tzinfo=UTC)
    await store.write_batch([make(org, "far", far)])
    assert (
        await db.fetchval("SELECT count(*) FROM usage_events_default WHERE org_id = $1", org) == 1
    )
    assert await store.ensure_partitions(far.date(), far.date()) == 1
    assert (
        await db.fetchval("SELECT count(*) FROM usage_events_default WHERE org_id = $1", org) == 0
    )
    assert (
        await db.fetchval("SELECT count(*) FROM usage_events_2031_06 WHERE org_id = $1", org) == 1
    )
    assert await store.ensure_partitions(far.date(), far.date()) == 0


async def test_failed_transaction_leaves_no_claimed_id(
    store: EventStore, db: asyncpg.Connection
) -> None:
    """The claim and the store are one transaction: an id is never 'seen' without its row."""
    org = uuid.uuid4()
    bad = make(org, "boom", datetime.now(UTC))
    # quantity violates the CHECK (quantity >= 0) only at the database: bypass the model.
    object.__setattr__(bad.event, "quantity", Decimal(-1))
    with pytest.raises(asyncpg.CheckViolationError):
        await store.write_batch([bad])
    assert await db.fetchval("SELECT count(*) FROM usage_event_ids WHERE org_id = $1", org) == 0
    retried = await store.write_batch([make(org, "boom", datetime.now(UTC))])
    assert retried.stored == 1
