"""Changing an organization's time zone re-aggregates its history in the new zone
(migration 015), on the real PostgreSQL: the rows follow the new calendar and `reconcile`
agrees, before and after more events arrive."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from metering.storage.events import EventStore
from tests.aggregator.conftest import Events, aggregates, subscribe

pytestmark = pytest.mark.services


async def test_a_new_zone_recomputes_the_history_and_reconcile_agrees(
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
    aggregator: Aggregator,
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org, "pro", "UTC")
    events = Events(event_store, org)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    late, early = midnight - timedelta(minutes=30), midnight + timedelta(minutes=30)
    user = uuid.uuid4()
    await events.add("api_call", late.isoformat(), 2)
    await events.add("api_call", early.isoformat(), 3)
    await events.add("user_active", late.isoformat(), user=user)
    await events.add("user_active", early.isoformat(), user=user)
    await aggregator.run_once()
    day_before, day = (midnight - timedelta(days=1)).date(), midnight.date()
    before = await aggregates(db, org)
    assert before[("api_call", "day", day_before.isoformat())] == ("2", 1)
    assert before[("api_call", "day", day.isoformat())] == ("3", 1)

    # Tokyo is 9 hours ahead: both events fall on `day` there, and one user is one user
    await db.execute("UPDATE org_subscriptions SET timezone = 'Asia/Tokyo' WHERE org_id = $1", org)
    after = await aggregates(db, org)
    assert after[("api_call", "day", day.isoformat())] == ("5", 2)
    assert ("api_call", "day", day_before.isoformat()) not in after
    assert after[("user_active", "day", day.isoformat())] == ("1", 2)
    window = (day - timedelta(days=40), day + timedelta(days=2))
    assert await aggregate_store.reconcile(*window, org) == []

    # events after the change are counted in the new zone by the incremental pass
    await events.add("api_call", (early + timedelta(hours=1)).isoformat(), 4)
    await aggregator.run_once()
    assert (await aggregates(db, org))[("api_call", "day", day.isoformat())] == ("9", 3)
    assert await aggregate_store.reconcile(*window, org) == []
    # and back: the same events, the UTC calendar again
    await db.execute("UPDATE org_subscriptions SET timezone = 'UTC' WHERE org_id = $1", org)
    back = await aggregates(db, org)
    assert back[("api_call", "day", day_before.isoformat())] == ("2", 1)
    assert back[("api_call", "day", day.isoformat())] == ("7", 2)
    assert await aggregate_store.reconcile(*window, org) == []
