"""write_batch on the real PostgreSQL: one row per (org_id, id), ever."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.errors import InvalidEvent
from metering.models import EventType, UsageEvent, parse_event
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


def unstorable(org: uuid.UUID, event_id: str, when: datetime) -> IncomingEvent:
    """An event validation would refuse, built past the model: jsonb refuses U+0000."""
    item = make(org, event_id, when)
    object.__setattr__(item.event, "metadata", {"note": "nul \x00 inside"})
    return IncomingEvent(item.event, item.partition, item.offset)  # its row made again


async def test_write_isolating_stores_all_but_the_refused_events(
    store: EventStore, db: asyncpg.Connection
) -> None:
    org = uuid.uuid4()
    now = datetime.now(UTC)
    batch = [make(org, f"ok-{n}", now) for n in range(9)]
    batch.insert(3, unstorable(org, "bad-1", now))
    batch.insert(7, unstorable(org, "bad-2", now))
    batch.append(make(org, "ok-0", now, 5))  # a duplicate of a good one, after the bad ones
    with pytest.raises(asyncpg.UntranslatableCharacterError):
        await store.write_batch(batch)

    result, refused = await store.write_isolating(batch)

    assert (result.stored, result.duplicates) == (9, 1)
    assert [r.item.event.id for r in refused] == ["bad-1", "bad-2"]
    assert {r.sqlstate for r in refused} == {"22P05"}
    rows = await db.fetch(
        "SELECT event_id, quantity FROM usage_events WHERE org_id = $1 ORDER BY event_id", org
    )
    assert [(r["event_id"], r["quantity"]) for r in rows] == [(f"ok-{n}", 1) for n in range(9)]
    assert await db.fetchval("SELECT count(*) FROM usage_event_ids WHERE org_id = $1", org) == 9
    assert await db.fetchval("SELECT plan FROM org_subscriptions WHERE org_id = $1", org) == "free"


# Any character at all, U+0000 and lone surrogates included: what a producer can put in JSON.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
wild_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def raw_events(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(list(EventType)))
    document: dict[str, object] = {
        "id": draw(st.from_regex(r"\A[A-Za-z0-9._:-]{1,16}\Z")),
        "type": kind.value,
        "org_id": "00000000-0000-4000-8000-000000000000",  # replaced per example
        "occurred_at": (
            datetime.now(UTC) - timedelta(seconds=draw(st.integers(0, 86400)))
        ).isoformat(),
        "quantity": draw(
            st.integers(0, 10**17)
            | st.decimals(0, 10**12, places=6, allow_nan=False, allow_infinity=False).map(float)
        ),
        "metadata": draw(st.dictionaries(any_text, wild_json, max_size=4)),
    }
    if kind is EventType.USER_ACTIVE:
        document["user_id"] = str(draw(st.uuids()))
    return json.dumps(document).encode()


@given(st.lists(raw_events(), min_size=1, max_size=20))
@settings(max_examples=60, deadline=None)
def test_every_event_validation_accepts_is_stored(
    migrated_database: str, batch: list[bytes]
) -> None:
    """Validation and PostgreSQL agree: no accepted event can make its batch fail."""
    org = str(uuid.uuid4())
    now = datetime.now(UTC)
    accepted = []
    for raw in batch:
        try:
            event = parse_event(
                raw.replace(b"00000000-0000-4000-8000-000000000000", org.encode()),
                now=now,
                lateness_window=timedelta(days=35),
            )
        except InvalidEvent:
            continue
        accepted.append(IncomingEvent(event))

    async def write() -> int:
        pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=1)
        assert pool is not None
        try:
            result = await EventStore(pool).write_batch(accepted)
            stored: int = await pool.fetchval(
                "SELECT count(*) FROM usage_events WHERE org_id = $1", uuid.UUID(org)
            )
            assert result.stored == stored
            return stored
        finally:
            await pool.close()

    assert asyncio.run(write()) == len({item.event.id for item in accepted})
