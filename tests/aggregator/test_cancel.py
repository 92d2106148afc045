"""Cancelled events (contract section 10) on the real aggregator and PostgreSQL: every
aggregation kind and the seeded meters corrected as the plain-Python reference says without
the cancelled events, `reconcile` clean after, crossings already recorded kept, cancels
racing with passes and with a backfill, and the outcomes of unknown, duplicate, repeated
and too old ids."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from aggregator.semantics import expected_time_weighted, windows_between
from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from metering.corrections.cancel import CancelStore
from metering.errors import EventNotFound, OutsideLatenessWindow
from metering.meters.store import MeterStore
from metering.meters.usage_store import MeterUsageStore
from metering.storage.audit import AuditLog
from metering.storage.events import EventStore
from tests.aggregator.conftest import subscribe
from tests.aggregator.test_meters import Stored, a_type, reference, settle, spec, stored_rows

pytestmark = pytest.mark.services

NOW = datetime.now(UTC).replace(microsecond=0)
LATENESS = timedelta(days=35)
ZONE = ZoneInfo("Europe/Berlin")


def cancels(pool: asyncpg.Pool) -> CancelStore:
    return CancelStore(pool, AuditLog(pool), LATENESS)


def whole_window() -> tuple[date, date]:
    first = (NOW - timedelta(days=40)).date().replace(day=1)
    return first, (NOW + timedelta(days=40)).date()


async def cancel(pool: asyncpg.Pool, events: Stored, org: uuid.UUID, *ids: str) -> None:
    """Cancel `ids` of `org` in the database and forget them in the reference."""
    outcomes = await cancels(pool).cancel_ids(org, list(ids), actor="test", reason="wrong")
    assert {o.status for o in outcomes} == {"cancelled"}, outcomes
    for event_id in ids:
        del events.kept[(org, event_id)]


async def test_cancelling_corrects_every_kind_and_the_seeded_meters(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    kind = a_type()
    tag = kind[2:8]
    definitions = [
        spec(key=f"csum_{tag}", event_type=kind, aggregation="sum", group_by=["model"]),
        spec(key=f"ccnt_{tag}", event_type=kind, aggregation="count"),
        spec(key=f"cmax_{tag}", event_type=kind, aggregation="max"),
        spec(key=f"clat_{tag}", event_type=kind, aggregation="latest", group_by=["model"]),
        spec(key=f"cunq_{tag}", event_type=kind, aggregation="unique_count"),
        spec(key=f"ctw_{tag}", event_type=kind, aggregation="time_weighted", group_by=["model"]),
    ]
    for definition in definitions:
        await MeterStore(pool).create(definition)
    await settle(aggregator)
    org = uuid.uuid4()
    await subscribe(db, org, timezone="Europe/Berlin")
    zones = {org: "Europe/Berlin"}
    events = Stored(event_store, kind)
    users = [uuid.uuid4() for _ in range(3)]
    base = NOW - timedelta(days=3)
    await events.add(
        *[
            {
                "org": org,
                "id": f"k{n}",
                "at": base + timedelta(hours=5 * n),
                "quantity": (n * 7) % 11,
                "user": users[n % 3] if n < 9 else users[0],
                "metadata": {"model": ["gpt", "claude"][n % 2]},
            }
            for n in range(12)
        ]
    )
    # the seeded meters in the same org: a sum with a limit, distinct users, a gauge
    v1 = Stored(event_store, "api_call")
    await v1.add({"org": org, "id": "big", "at": base, "quantity": 1000})
    await v1.add({"org": org, "id": "small", "at": base, "quantity": 10})
    gauge = Stored(event_store, "storage_used")
    await gauge.add({"org": org, "id": "g1", "at": base, "quantity": 5})
    await gauge.add({"org": org, "id": "g2", "at": base + timedelta(hours=1), "quantity": 9})
    people = Stored(event_store, "user_active")
    await people.add({"org": org, "id": "u1", "at": base, "user": users[1]})
    await people.add({"org": org, "id": "u2", "at": base, "user": users[2]})
    await settle(aggregator)
    crossings = await db.fetch(
        "SELECT threshold_percent FROM limit_notifications WHERE org_id = $1", org
    )
    assert {r["threshold_percent"] for r in crossings} == {80, 100}

    # the highest and the latest readings, the only event of users[2] (k2, k5, k8: n % 3
    # == 2 below 9), a time-weighted reading in the middle, and a seeded event of each kind
    await cancel(pool, events, org, "k2", "k5", "k8", "k11", "k6")
    await cancels(pool).cancel_ids(org, ["big", "g2", "u2"], actor="test", reason="wrong")
    await settle(aggregator)

    for definition in definitions:
        if definition.aggregation == "time_weighted":
            continue
        expected = reference(definition, events, zones)
        assert await stored_rows(db, definition, [org], zones) == expected, definition.key
    tw = definitions[-1]
    answer = await MeterUsageStore(pool).usage(
        org,
        tw.key,
        window="day",
        tz=None,
        start=(base - timedelta(days=1)).date().isoformat(),
        end=(NOW + timedelta(days=2)).date().isoformat(),
        group_by=["model"],
        filters={},
        now=NOW,
    )
    got = {
        (tuple(json.loads(r.dimensions).items()), r.start): (r.value, r.event_count)
        for r in answer.rows
    }
    windows = windows_between(
        answer.windows.start_instant, answer.windows.end_instant, "day", "Europe/Berlin"
    )
    assert got == expected_time_weighted(tw, events.kept.values(), windows, NOW, ("model",))

    month = base.astimezone(ZONE).date().replace(day=1)
    rows = {
        r["event_type"]: (r["value"], r["event_count"])
        for r in await db.fetch(
            "SELECT event_type, value, event_count FROM usage_aggregations "
            "WHERE org_id = $1 AND period = 'month' AND period_start = $2",
            org,
            month,
        )
    }
    assert rows["api_call"] == (Decimal(10), 1)
    assert rows["storage_used"] == (Decimal(5), 1)
    assert rows["user_active"] == (Decimal(1), 1)
    # crossings already recorded stay recorded; the access check sees the lower usage
    still = await db.fetch("SELECT 1 FROM limit_notifications WHERE org_id = $1", org)
    assert len(still) == 2
    access = json.loads(
        await db.fetchval(
            "SELECT check_feature_access(NULL, 'max_api_calls_per_month', $1, 1)", org
        )
    )
    assert (access["used"], access["allowed"]) == (10, True)
    assert await AggregateStore(pool).reconcile(*whole_window(), org) == []


async def test_an_event_cancelled_before_its_first_pass_is_never_counted(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    kind = a_type()
    meter = spec(key=f"cnew_{kind[2:8]}", event_type=kind, aggregation="sum")
    await MeterStore(pool).create(meter)
    await settle(aggregator)
    org = uuid.uuid4()
    await subscribe(db, org)
    events = Stored(event_store, kind)
    v1 = Stored(event_store, "api_call")
    await events.add({"org": org, "id": "a", "at": NOW, "quantity": 3})
    await events.add({"org": org, "id": "b", "at": NOW, "quantity": 4})
    await v1.add({"org": org, "id": "c", "at": NOW, "quantity": 5})
    await cancel(pool, events, org, "a")
    await cancels(pool).cancel_ids(org, ["c"], actor="test", reason="wrong")
    await settle(aggregator)
    assert await stored_rows(db, meter, [org]) == reference(meter, events, {org: "UTC"})
    assert await db.fetchval("SELECT count(*) FROM usage_aggregations WHERE org_id = $1", org) == 0
    assert await AggregateStore(pool).reconcile(*whole_window(), org) == []


async def test_cancels_racing_with_passes_count_each_event_once(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    """Events stored and cancelled while passes run back to back: whatever interleaving
    happens, the numbers are those of the events not cancelled."""
    kind = a_type()
    tag = kind[2:8]
    definitions = [
        spec(key=f"rsum_{tag}", event_type=kind, aggregation="sum"),
        spec(key=f"rlat_{tag}", event_type=kind, aggregation="latest"),
        spec(key=f"runq_{tag}", event_type=kind, aggregation="unique_count"),
    ]
    for definition in definitions:
        await MeterStore(pool).create(definition)
    await settle(aggregator)
    org = uuid.uuid4()
    await subscribe(db, org)
    events = Stored(event_store, kind)
    users = [uuid.uuid4() for _ in range(5)]
    rng = random.Random(7)
    stop = asyncio.Event()

    async def produce() -> None:
        for n in range(60):
            await events.add(
                {
                    "org": org,
                    "id": f"r{n}",
                    "at": NOW - timedelta(hours=rng.randint(0, 24 * 20)),
                    "quantity": rng.randint(0, 9),
                    "user": rng.choice(users),
                }
            )
            if n % 3 == 2:
                victim = rng.choice([i for (o, i) in events.kept if o == org])
                await cancel(pool, events, org, victim)
            await asyncio.sleep(0.01)  # let passes run between the writes
        stop.set()

    async def passes() -> int:
        count = 0
        while not stop.is_set():
            await aggregator.run_once(publish=False)
            count += 1
        return count

    _, ran = await asyncio.gather(produce(), passes())
    assert ran > 1
    await settle(aggregator)
    for definition in definitions:
        expected = reference(definition, events, {org: "UTC"})
        assert await stored_rows(db, definition, [org]) == expected, definition.key
    assert await AggregateStore(pool).reconcile(*whole_window(), org) == []


async def test_cancels_during_a_backfill(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    """A meter created over stored events, some cancelled before it, some while its
    backfill runs (behind and ahead of its position): each counted once or not at all."""
    kind = a_type()
    org = uuid.uuid4()
    await subscribe(db, org)
    events = Stored(event_store, kind)
    await events.add(
        *[
            {"org": org, "id": f"b{n}", "at": NOW - timedelta(hours=3 * n), "quantity": n}
            for n in range(40)
        ]
    )
    await settle(aggregator)
    await cancel(pool, events, org, "b3")
    meter = spec(key=f"cbf_{kind[2:8]}", event_type=kind, aggregation="sum")
    store = MeterStore(pool)
    await store.create(meter)
    victims = iter(["b39", "b0", "b20", "b38", "b1", "b21"])
    for _ in range(200):
        await aggregator.run_once(publish=False)
        victim = next(victims, None)
        if victim is not None:
            await cancel(pool, events, org, victim)
        if (await store.get(meter.key)).status == "active" and victim is None:
            break
    await settle(aggregator)
    assert (await store.get(meter.key)).status == "active"
    assert await stored_rows(db, meter, [org]) == reference(meter, events, {org: "UTC"})
    assert await AggregateStore(pool).reconcile(*whole_window(), org) == []


async def test_outcomes_of_unknown_duplicate_repeated_and_old_ids(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org)
    v1 = Stored(event_store, "api_call")
    await v1.add({"org": org, "id": "dup", "at": NOW, "quantity": 2})
    await v1.add({"org": org, "id": "dup", "at": NOW, "quantity": 50})  # a duplicate: ignored
    await v1.add({"org": org, "id": "old", "at": NOW - timedelta(days=36), "quantity": 1})
    await v1.add({"org": org, "id": "kept", "at": NOW, "quantity": 7})
    store = cancels(pool)
    first = await store.cancel_ids(
        org, ["dup", "nope", "old", "dup"], actor="key:mk_x (ops)", reason="double send"
    )
    assert [(o.event_id, o.status) for o in first] == [
        ("dup", "cancelled"),
        ("nope", "unknown"),
        ("old", "outside_window"),
    ]
    assert first[0].quantity == Decimal(2)  # the stored one, not the duplicate's
    again = await store.cancel_one(org, "dup", actor="someone else", reason="again")
    assert (again.status, again.cancelled_by, again.reason) == (
        "already_cancelled",
        "key:mk_x (ops)",
        "double send",
    )
    # the id stays claimed: a re-send is not stored again
    await v1.add({"org": org, "id": "dup", "at": NOW, "quantity": 3})
    assert (
        await db.fetchval(
            "SELECT count(*) FROM usage_events WHERE org_id = $1 AND event_id = 'dup'", org
        )
        == 1
    )
    await settle(aggregator)
    month = await db.fetchrow(
        "SELECT value, event_count FROM usage_aggregations "
        "WHERE org_id = $1 AND event_type = 'api_call' AND period = 'day' AND period_start = $2",
        org,
        NOW.date(),
    )
    assert month is not None
    assert (month["value"], month["event_count"]) == (Decimal(7), 1)
    trail = await AuditLog(pool).entries(org_id=org)
    assert [(e.action, e.actor, e.details["cancelled"], e.details["ids"]) for e in trail] == [
        ("events.cancel", "key:mk_x (ops)", 1, ["dup"])
    ]
    with pytest.raises(EventNotFound):
        await store.cancel_one(org, "nope", actor="a", reason="r")
    with pytest.raises(OutsideLatenessWindow):
        await store.cancel_one(org, "old", actor="a", reason="r")
