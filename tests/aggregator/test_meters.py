"""Meters that are not builtin, counted by the real aggregator in the real PostgreSQL and
held to the plain-Python reference (aggregator.semantics.expected_meter_usage): every
aggregation kind, value paths, filters, dimensions, skips, late events, duplicates, a DST
day, and the hand-over between backfill and the incremental pass."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from aggregator.backfill import Backfiller
from aggregator.meter_store import MARK_METER_WORK
from aggregator.semantics import (
    StoredEvent,
    expected_meter_usage,
    expected_time_weighted,
    windows_between,
)
from aggregator.service import Aggregator, decide_crossings
from aggregator.store import AggregateStore
from metering.config import Settings
from metering.meters.definition import MeterSpec
from metering.meters.store import MeterConflict, MeterStore
from metering.meters.usage_store import MeterUsageStore
from metering.metrics import AggregatorMetrics
from metering.models import UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.aggregator.conftest import subscribe

pytestmark = pytest.mark.services

NOW = datetime.now(UTC).replace(microsecond=0)


def a_type() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


class Stored:
    """Stores events of one type and remembers them for the reference."""

    def __init__(self, store: EventStore, event_type: str) -> None:
        self.store = store
        self.event_type = event_type
        self.kept: dict[tuple[uuid.UUID, str], StoredEvent] = {}
        self.sent = 0

    async def add(self, *events: dict[str, Any]) -> None:
        batch = []
        for fields in events:
            self.sent += 1
            event = UsageEvent(
                id=fields.get("id", f"e{self.sent}"),
                type=self.event_type,
                org_id=fields["org"],
                user_id=fields.get("user"),
                quantity=Decimal(fields.get("quantity", 1)),
                occurred_at=fields["at"],
                metadata=fields.get("metadata"),
            )
            batch.append(IncomingEvent(event))
            self.kept.setdefault(
                (event.org_id, event.id),
                StoredEvent(
                    event.org_id, event.occurred_at, event.quantity, event.user_id, event.metadata
                ),
            )
        await self.store.write_batch(batch)


async def stored_rows(
    db: asyncpg.Connection,
    meter: MeterSpec,
    orgs: list[uuid.UUID],
    zones: dict[uuid.UUID, str] | None = None,
) -> dict[Any, tuple[Decimal, int]]:
    rows = await db.fetch(
        "SELECT org_id, dimensions, period, period_start, value, event_count "
        "FROM meter_aggregations WHERE meter_key = $1 AND org_id = ANY($2)",
        meter.key,
        orgs,
    )
    result = {}
    for r in rows:
        dims = json.loads(r["dimensions"])
        key = (
            r["org_id"],
            tuple((path, dims[path]) for path in meter.group_by),
            r["period"],
            datetime.combine(
                r["period_start"],
                datetime.min.time(),
                ZoneInfo((zones or {}).get(r["org_id"], "UTC")),
            ),
        )
        result[key] = (r["value"], r["event_count"])
    return result


def reference(
    meter: MeterSpec, events: Stored, zones: dict[uuid.UUID, str]
) -> dict[Any, tuple[Decimal, int]]:
    expected: dict[Any, tuple[Decimal, int]] = {}
    for window in ("day", "month"):
        rows, _ = expected_meter_usage(meter, events.kept.values(), zones, window)
        expected.update(rows)
    return expected


async def settle(aggregator: Aggregator) -> None:
    """Passes (and backfill chunks) until nothing is left to do."""
    for _ in range(10_000):
        result = await aggregator.run_once(publish=False)
        if result.events == 0 and not aggregator.backfilling:
            return
    raise AssertionError("the aggregator never settled")


def spec(**fields: Any) -> MeterSpec:
    return MeterSpec.parse(fields)


async def test_every_kind_matches_the_reference(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    kind = a_type()
    meters = MeterStore(pool)
    tag = kind[2:8]
    definitions = [
        spec(key=f"sum_{tag}", event_type=kind, aggregation="sum"),
        spec(key=f"cnt_{tag}", event_type=kind, aggregation="count", group_by=["model"]),
        spec(key=f"max_{tag}", event_type=kind, aggregation="max", value="metadata.load.cpu"),
        spec(key=f"lat_{tag}", event_type=kind, aggregation="latest", group_by=["model", "region"]),
        spec(key=f"unq_{tag}", event_type=kind, aggregation="unique_count"),
        spec(
            key=f"unm_{tag}",
            event_type=kind,
            aggregation="unique_count",
            value="metadata.session",
            filter={"env": ["prod", "staging"]},
        ),
        spec(
            key=f"tok_{tag}",
            event_type=kind,
            aggregation="sum",
            value="metadata.tokens",
            filter={"env": "prod", "billable": True},
            group_by=["model"],
        ),
    ]
    for definition in definitions:
        await meters.create(definition)
    await settle(aggregator)  # the meters start counting here (nothing stored to backfill)
    for definition in definitions:
        assert (await meters.get(definition.key)).status == "active"

    berlin, utc = uuid.uuid4(), uuid.uuid4()
    await subscribe(db, berlin, timezone="Europe/Berlin")
    zones = {berlin: "Europe/Berlin", utc: "UTC"}
    events = Stored(event_store, kind)
    users = [uuid.uuid4() for _ in range(3)]
    base = NOW - timedelta(days=3)
    await events.add(
        *[
            {
                "org": org,
                "at": base + timedelta(hours=7 * n),
                "quantity": n % 4,
                "user": users[n % 3] if n % 5 else None,
                "metadata": {
                    "model": ["gpt", "claude", None][n % 3],
                    "region": "eu" if n % 2 else "us",
                    "env": ["prod", "staging", "dev"][n % 3],
                    "billable": n % 4 != 0,
                    "tokens": [120, "35.5", "lots", None][n % 4],
                    "session": f"s{n % 4}",
                    "load": {"cpu": n % 7} if n % 6 else {},
                },
            }
            for n in range(24)
            for org in (berlin, utc)
        ]
    )
    await settle(aggregator)
    # a late event, a duplicate (ignored), and gauge readings out of order
    await events.add(
        {
            "org": berlin,
            "at": base - timedelta(days=20),
            "quantity": 9,
            "metadata": {"model": "gpt"},
        },
        {"org": berlin, "at": base, "id": "e1", "quantity": 1000},
        {"org": utc, "at": base + timedelta(hours=1), "quantity": 5, "metadata": {"model": "x"}},
        {"org": utc, "at": base + timedelta(hours=1), "quantity": 7, "metadata": {"model": "x"}},
    )
    await settle(aggregator)
    for definition in definitions:
        expected = reference(definition, events, zones)
        assert expected, definition.key
        assert await stored_rows(db, definition, [berlin, utc], zones) == expected, definition.key
    skips = {
        (r["meter_key"], r["reason"]): r["events"]
        for r in await db.fetch("SELECT * FROM meter_skips WHERE meter_key LIKE $1", f"%_{tag}")
    }
    for definition in definitions:
        _, skipped = expected_meter_usage(definition, events.kept.values(), zones)
        for reason, count in skipped.items():
            assert skips[(definition.key, reason)] == count, (definition.key, reason)


async def test_a_new_meter_counts_the_past_and_what_arrives_during_its_backfill(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    kind = a_type()
    opener = spec(key=f"open_{kind[2:]}", event_type=kind, aggregation="count")
    meters = MeterStore(pool)
    await meters.create(opener)
    await settle(aggregator)
    orgs = [uuid.uuid4() for _ in range(4)]
    events = Stored(event_store, kind)
    start = NOW - timedelta(days=30)
    for batch in range(10):
        await events.add(
            *[
                {
                    "org": orgs[n % 4],
                    "at": start + timedelta(minutes=97 * (batch * 30 + n)),
                    "quantity": n % 9,
                    "metadata": {"sku": f"k{n % 3}"},
                }
                for n in range(30)
            ]
        )
        await aggregator.run_once(publish=False)
    # the fixture's backfill reads 5 events a chunk: many steps, passes and arrivals between
    late = spec(key=f"late_{kind[2:]}", event_type=kind, aggregation="sum", group_by=["sku"])
    await meters.create(late)
    assert (await meters.get(late.key)).status == "backfilling"
    # events keep arriving while the backfill runs, chunk by chunk, between passes
    steps = 0
    while (await meters.get(late.key)).status == "backfilling":
        steps += 1
        await events.add(
            {"org": orgs[steps % 4], "at": NOW - timedelta(days=steps % 25), "quantity": steps},
            {"org": orgs[0], "at": start + timedelta(hours=steps), "metadata": {"sku": "k1"}},
        )
        await aggregator.run_once(publish=False)
        assert steps < 5_000
    assert steps > 10  # the backfill and the arrivals did interleave
    await settle(aggregator)
    shown = await meters.get(late.key)
    assert shown.backfill_fraction() == 1.0
    assert shown.row["backfill_read"] == shown.row["backfill_total"] > 0
    assert await stored_rows(db, late, orgs) == reference(late, events, {})
    assert await stored_rows(db, opener, orgs) == reference(opener, events, {})
    note = await db.fetchrow("SELECT * FROM meter_notifications WHERE meter_key = $1", late.key)
    assert note is not None and note["kind"] == "meter.backfilled"

    # reconcile recomputes every meter and dimension from usage_events, and catches a
    # tampered dimension row
    store = AggregateStore(pool)
    window = ((start - timedelta(days=2)).date(), (NOW + timedelta(days=2)).date())
    for org in orgs:
        assert await store.reconcile(*window, org) == []
    tampered = await db.fetchrow(
        "UPDATE meter_aggregations SET value = value + 1 WHERE meter_key = $1 AND org_id = $2 "
        "AND period = 'day' AND dimensions = '{\"sku\": \"k1\"}' "
        "AND period_start = (SELECT max(period_start) FROM meter_aggregations "
        'WHERE meter_key = $1 AND org_id = $2 AND dimensions = \'{"sku": "k1"}\') '
        "RETURNING period_start, value",
        late.key,
        orgs[0],
    )
    assert tampered is not None
    found = await store.reconcile(*window, orgs[0])
    assert [(d["event_type"], d["dimensions"], d["period"], d["period_start"]) for d in found] == [
        (late.key, '{"sku": "k1"}', "day", tampered["period_start"])
    ]
    assert found[0]["stored_value"] == found[0]["expected_value"] + 1
    await db.execute(
        "UPDATE meter_aggregations SET value = value - 1 WHERE meter_key = $1 AND org_id = $2 "
        "AND period = 'day' AND dimensions = '{\"sku\": \"k1\"}' AND period_start = $3",
        late.key,
        orgs[0],
        tampered["period_start"],
    )


async def test_meter_conflicts_are_refused(pool: asyncpg.Pool) -> None:
    meters = MeterStore(pool)
    kind = a_type()
    first = spec(key=f"dup_{kind[2:]}", event_type=kind, aggregation="sum")
    await meters.create(first)
    with pytest.raises(MeterConflict) as taken:
        await meters.create(first)
    assert taken.value.code == "key_taken"
    with pytest.raises(MeterConflict) as limit:
        await meters.create(
            spec(key=f"lim_{kind[2:]}", event_type=kind, aggregation="sum", limit_key="max_records")
        )
    assert limit.value.code == "limit_taken"  # the seeded record_created meter counts it
    with pytest.raises(MeterConflict) as unknown:
        await meters.create(
            spec(key=f"unk_{kind[2:]}", event_type=kind, aggregation="sum", limit_key="max_nope")
        )
    assert unknown.value.code == "unknown_limit_key"
    archived = await meters.archive(first.key)
    assert archived.status == "archived"
    with pytest.raises(MeterConflict):
        await meters.create(first)  # keys are never reused
    with pytest.raises(MeterConflict) as builtin:
        await meters.archive("api_call")
    assert builtin.value.code == "builtin_meter"


PATHS = st.sampled_from(["a", "b", "c.d"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["x", "y", "2.5", "1e2", "n"])
)


@st.composite
def meter_and_events(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    aggregation = draw(st.sampled_from(["sum", "count", "max", "latest", "unique_count"]))
    definition: dict[str, Any] = {"aggregation": aggregation}
    if aggregation != "count" and draw(st.booleans()):
        definition["value"] = "metadata." + draw(PATHS)
    if draw(st.booleans()):
        definition["filter"] = {draw(PATHS): draw(st.lists(SCALARS, min_size=1, max_size=3))}
    definition["group_by"] = draw(st.lists(PATHS, max_size=2, unique=True))
    events = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "org": st.integers(0, 1),
                    "hours": st.integers(0, 24 * 40),
                    "quantity": st.integers(0, 5),
                    "user": st.none() | st.integers(0, 2),
                    "a": SCALARS,
                    "b": SCALARS,
                    "c": st.none() | st.fixed_dictionaries({"d": SCALARS}),
                    "pass_after": st.booleans(),
                }
            ),
            max_size=25,
        )
    )
    definition["created_after"] = draw(st.integers(0, len(events)))
    return definition, events


@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=meter_and_events())
async def test_random_meters_equal_the_reference(
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregator: Aggregator,
    case: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    definition, drawn = case
    created_after = definition.pop("created_after")
    kind = a_type()
    meter = spec(key=f"p_{kind[2:]}", event_type=kind, **definition)
    # an opener meter of the type exists from the start; the meter under test is created
    # after `created_after` events (those it backfills, the rest the passes count)
    await MeterStore(pool).create(spec(key=f"o_{kind[2:]}", event_type=kind, aggregation="count"))
    orgs = [uuid.uuid4(), uuid.uuid4()]
    await subscribe(db, orgs[1], timezone="America/New_York")
    zones = {orgs[1]: "America/New_York"}
    users = [uuid.uuid4() for _ in range(3)]
    events = Stored(event_store, kind)
    for n, item in enumerate(drawn):
        if n == created_after:
            await aggregator.run_once(publish=False)
            await MeterStore(pool).create(meter)
        metadata = {k: item[k] for k in ("a", "b", "c") if item[k] is not None or n % 2}
        await events.add(
            {
                "org": orgs[item["org"]],
                "at": NOW - timedelta(days=41) + timedelta(hours=item["hours"]),
                "quantity": item["quantity"],
                "user": None if item["user"] is None else users[item["user"]],
                "metadata": metadata,
            }
        )
        if item["pass_after"]:
            await aggregator.run_once(publish=False)
    if created_after == len(drawn):
        await MeterStore(pool).create(meter)
    await settle(aggregator)
    assert await stored_rows(db, meter, orgs, zones) == reference(meter, events, zones)


async def test_a_zone_change_recounts_the_meters_in_the_new_zone(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    kind = a_type()
    meters = MeterStore(pool)
    for definition in (
        spec(key=f"zs_{kind[2:]}", event_type=kind, aggregation="sum", group_by=["m"]),
        spec(key=f"zu_{kind[2:]}", event_type=kind, aggregation="unique_count"),
    ):
        await meters.create(definition)
    org = uuid.uuid4()
    await subscribe(db, org, timezone="Pacific/Auckland")
    events = Stored(event_store, kind)
    await events.add(
        *[
            {
                "org": org,
                "at": NOW - timedelta(hours=5 * n),
                "quantity": n,
                "user": uuid.UUID(int=n % 5),
                "metadata": {"m": str(n % 2)},
            }
            for n in range(60)
        ]
    )
    await settle(aggregator)
    await db.execute(
        "UPDATE org_subscriptions SET timezone = 'America/Los_Angeles' WHERE org_id = $1", org
    )
    zones = {org: "America/Los_Angeles"}
    for key in (f"zs_{kind[2:]}", f"zu_{kind[2:]}"):
        meter = (await meters.get(key)).row
        definition = spec(
            key=key,
            event_type=kind,
            aggregation=meter["aggregation"],
            group_by=list(meter["group_by"]),
        )
        assert await stored_rows(db, definition, [org], zones) == reference(
            definition, events, zones
        )
    window = ((NOW - timedelta(days=20)).date(), (NOW + timedelta(days=2)).date())
    assert await AggregateStore(pool).reconcile(*window, org) == []


@pytest.mark.parametrize(
    ("window", "zone", "kept"),
    [
        ("hour", None, ("bucket",)),
        ("day", None, ("bucket",)),
        ("day", "UTC", ()),
        ("month", None, ()),
        ("hour", "Asia/Kolkata", ()),
    ],
)
async def test_time_weighted_equals_the_reference(
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregator: Aggregator,
    window: str,
    zone: str | None,
    kept: tuple[str, ...],
) -> None:
    """Byte-hours of storage gauges per bucket: readings out of order, two readings at one
    instant (the larger counts), a late reading, the end of summer time in Berlin (a
    25-hour day), the reading before a window carried in, the current window up to now."""
    kind = a_type()
    meter = spec(
        key=f"tw_{kind[2:]}", event_type=kind, aggregation="time_weighted", group_by=["bucket"]
    )
    await MeterStore(pool).create(meter)
    org = uuid.uuid4()
    await subscribe(db, org, timezone="Europe/Berlin")
    events = Stored(event_store, kind)
    dst_end = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST, the repeated hour next
    readings = [
        (dst_end - timedelta(days=2, minutes=7), 100, "a"),
        (dst_end + timedelta(hours=1, minutes=10), 250, "a"),
        (dst_end - timedelta(hours=30), 40, "b"),
        (dst_end + timedelta(days=1, hours=3), 10, "a"),
        (dst_end + timedelta(hours=1, minutes=10), 300, "a"),  # same instant: the larger
        (dst_end + timedelta(days=40), 7, "b"),
    ]
    await events.add(
        *[{"org": org, "at": at, "quantity": q, "metadata": {"bucket": b}} for at, q, b in readings]
    )
    await settle(aggregator)
    await events.add(  # a late reading, stored after the others were counted
        {"org": org, "at": dst_end + timedelta(hours=9), "quantity": 5, "metadata": {"bucket": "b"}}
    )
    await settle(aggregator)
    where = zone or "Europe/Berlin"
    start = datetime(2026, 10, 22, tzinfo=ZoneInfo(where))
    span = timedelta(days=6) if window == "hour" else timedelta(days=30)
    if window == "month":
        start, span = datetime(2026, 10, 1, tzinfo=ZoneInfo(where)), timedelta(days=92)
    now = dst_end + timedelta(days=40, hours=5)
    answer = await MeterUsageStore(pool).usage(
        org,
        meter.key,
        window=window,
        tz=zone,
        start=start.isoformat(),
        end=(start + span).isoformat(),
        group_by=list(kept),
        filters={},
        now=now,
    )
    got = {
        (tuple(json.loads(r.dimensions).items()), r.start): (r.value, r.event_count)
        for r in answer.rows
    }
    windows = windows_between(
        answer.windows.start_instant, answer.windows.end_instant, window, where
    )
    expected = expected_time_weighted(meter, events.kept.values(), windows, now, kept)
    assert expected
    assert got == expected
    assert await AggregateStore(pool).reconcile(date(2026, 10, 1), date(2026, 12, 31), org) == []


async def test_meter_work_in_progress_does_not_hold_the_v1_pass_back(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, migrated_database: str
) -> None:
    """A transaction marked as meter work (a meter pass, a backfill chunk) may run for
    seconds; the v1 pass counts the events committed meanwhile. Any other transaction still
    running holds it back, as before (its events could still appear below the bound)."""
    store = AggregateStore(pool)
    org = uuid.uuid4()
    events = Stored(event_store, "api_call")
    await store.run_pass(decide_crossings)

    async def counted() -> int:
        value = await db.fetchval(
            "SELECT event_count FROM usage_aggregations WHERE org_id = $1 AND period = 'month'",
            org,
        )
        return int(value or 0)

    other = await asyncpg.connect(migrated_database)
    try:
        async with other.transaction():  # meter work holding an xid: not in the way
            await other.execute(MARK_METER_WORK)
            await other.execute("SELECT pg_current_xact_id()")
            await events.add({"org": org, "at": NOW})
            await store.run_pass(decide_crossings)
            assert await counted() == 1
        async with other.transaction():  # any other transaction holding an xid: waited for
            await other.execute("SELECT pg_current_xact_id()")
            await events.add({"org": org, "at": NOW})
            await store.run_pass(decide_crossings)
            assert await counted() == 1
    finally:
        await other.close()
    await store.run_pass(decide_crossings)
    assert await counted() == 2


async def test_a_meter_created_over_200k_stored_events_counts_each_once(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, settings: Settings
) -> None:
    """Issue 37's backfill test at its size: 200,000 stored events of the type (written in
    SQL, as the consumer would), events arriving between the backfill's chunks, reconcile
    after. Chunks of 20,000 events, the backfiller's default first size."""
    kind = a_type()
    meters = MeterStore(pool)
    await meters.create(spec(key=f"o2_{kind[2:]}", event_type=kind, aggregation="count"))
    aggregator = Aggregator(
        settings,
        AggregateStore(pool),
        None,
        AggregatorMetrics(CollectorRegistry()),
        backfiller=Backfiller(pool, chunk_events=20_000),
    )
    await settle(aggregator)
    orgs = [uuid.uuid4() for _ in range(50)]
    await db.execute(
        "INSERT INTO usage_events (org_id, event_id, event_type, quantity, occurred_at, metadata) "
        "SELECT ($1::uuid[])[1 + g % 50], 'b' || g, $2, g % 7, "
        "       now() - interval '20 days' * (g::float8 / 200000), "
        "       jsonb_build_object('sku', 'k' || (g % 30)) "
        "FROM generate_series(1, 200000) AS g",
        orgs,
        kind,
    )
    await settle(aggregator)  # the opener counts them: the new meter's past
    late = spec(key=f"b2_{kind[2:]}", event_type=kind, aggregation="sum", group_by=["sku"])
    await meters.create(late)
    events = Stored(event_store, kind)
    arrivals = 0
    while (await meters.get(late.key)).status == "backfilling":
        arrivals += 1
        await events.add(
            {"org": orgs[arrivals % 50], "at": NOW, "quantity": 3, "metadata": {"sku": "k1"}}
        )
        await aggregator.run_once(publish=False)
    await settle(aggregator)
    assert arrivals > 5
    sums = await db.fetch(
        "SELECT sum(value) AS value, sum(event_count) AS events FROM meter_aggregations "
        "WHERE meter_key = $1 AND period = 'month'",
        late.key,
    )
    expected = await db.fetchrow(
        "SELECT sum(quantity) AS value, count(*) AS events FROM usage_events WHERE event_type = $1",
        kind,
    )
    assert (sums[0]["value"], sums[0]["events"]) == (expected["value"], expected["events"])
    assert expected["events"] == 200_000 + arrivals
    window = ((NOW - timedelta(days=22)).date(), (NOW + timedelta(days=2)).date())
    for org in orgs[:5]:
        assert await AggregateStore(pool).reconcile(*window, org) == []
