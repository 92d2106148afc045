"""Aggregation on the real PostgreSQL: a golden scenario worked out by hand, idempotence,
a killed pass, reconcile, the access check and plan changes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from aggregator.limits import Crossing, LimitUsage, thresholds_reached
from aggregator.service import Aggregator, decide_crossings
from aggregator.store import AggregateStore, notified_set
from metering.config import Settings
from metering.metrics import AggregatorMetrics
from metering.models import EventType, UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.aggregator.conftest import Events, aggregates, subscribe
from tests.conftest import ROOT

pytestmark = pytest.mark.services
NEW_YORK = "America/New_York"  # DST began 2026-03-08 02:00 local: that day has 23 hours


async def test_golden_scenario(
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregator: Aggregator,
    aggregate_store: AggregateStore,
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org, "pro", NEW_YORK)
    events = Events(event_store, org)
    u1, u2 = uuid.uuid4(), uuid.uuid4()
    # api_call, local times in New York:
    await events.add("api_call", "2026-03-08T04:30:00Z", 5)  # Mar 7 23:30 EST
    await events.add("api_call", "2026-03-08T05:30:00Z", 7)  # Mar 8 00:30 EST
    await events.add("api_call", "2026-03-09T03:59:00Z", 2)  # Mar 8 23:59 EDT (after the change)
    await events.add("api_call", "2026-03-09T04:00:00Z", 3)  # Mar 9 00:00 EDT
    await events.add("api_call", "2026-04-01T03:30:00Z", 11)  # Mar 31 23:30 EDT: still March
    await events.add("api_call", "2026-04-01T04:00:00Z", 13)  # Apr 1 00:00 EDT
    await events.add("api_call", "2026-03-08T05:30:00Z", 99, event_id="e2")  # duplicate of e2
    # storage gauge: the latest reading by occurred_at wins, whatever the arrival order
    await events.add("storage_used", "2026-03-10T20:00:00Z", 900, event_id="g3")
    # repeated users
    await events.add("user_active", "2026-03-10T15:00:00Z", user=u1)
    await events.add("user_active", "2026-03-11T15:00:00Z", user=u1)
    await events.add("user_active", "2026-03-11T16:00:00Z", user=u1)
    await events.add("user_active", "2026-03-11T17:00:00Z", user=u2)
    await aggregator.run_once()

    # arriving later: readings that are older than the stored one, and a late api_call
    await events.add("storage_used", "2026-03-10T12:00:00Z", 500, event_id="g1")
    await events.add("storage_used", "2026-03-10T18:00:00Z", 300, event_id="g2")
    await events.add("api_call", "2026-03-08T03:00:00Z", 4)  # Mar 7 22:00 EST, late
    await aggregator.run_once()

    assert await aggregates(db, org) == {
        ("api_call", "day", "2026-03-07"): ("9", 2),  # 5 + late 4
        ("api_call", "day", "2026-03-08"): ("9", 2),  # 7 + 2, on a 23-hour day
        ("api_call", "day", "2026-03-09"): ("3", 1),
        ("api_call", "day", "2026-03-31"): ("11", 1),
        ("api_call", "day", "2026-04-01"): ("13", 1),
        ("api_call", "month", "2026-03-01"): ("32", 6),  # 5+7+2+3+11+4; the duplicate not at all
        ("api_call", "month", "2026-04-01"): ("13", 1),
        ("storage_used", "day", "2026-03-10"): ("900", 3),
        ("storage_used", "month", "2026-03-01"): ("900", 3),
        ("user_active", "day", "2026-03-10"): ("1", 1),
        ("user_active", "day", "2026-03-11"): ("2", 3),
        ("user_active", "month", "2026-03-01"): ("2", 4),
    }

    # The recompute from raw events (period bounds instead of per-event zone conversion)
    # gives the same numbers as the incremental passes: 23-hour day, month end, users.
    golden = await aggregates(db, org)
    window = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 3, tzinfo=UTC))
    for period in ("day", "month"):
        await aggregate_store.reaggregate(period, *window, org)
    assert await aggregates(db, org) == golden


async def test_pass_run_twice_changes_nothing(
    db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    org = uuid.uuid4()
    events = Events(event_store, org)
    wall = datetime.now(UTC)
    now = max(wall, wall.replace(hour=0, minute=5, second=0, microsecond=0))  # one day's minutes
    for n in range(5):
        await events.add("api_call", (now - timedelta(minutes=n)).isoformat(), 2)
    await aggregator.run_once()
    before = await aggregates(db, org)
    second = await aggregator.run_once()
    assert await aggregates(db, org) == before
    assert before[("api_call", "day", now.date().isoformat())] == ("10", 5)
    assert second.events == 0


async def test_every_aggregated_event_is_in_the_freshness_histogram(
    settings: Settings, event_store: EventStore, aggregate_store: AggregateStore
) -> None:
    registry = CollectorRegistry()
    aggregator = Aggregator(settings, aggregate_store, None, AggregatorMetrics(registry))
    await aggregator.run_once()
    events = Events(event_store, uuid.uuid4())
    now = datetime.now(UTC)
    for _ in range(3):  # each in its own transaction: several storage times
        await events.add("api_call", now.isoformat(), 1)
    await events.add("record_created", now.isoformat(), 1)
    result = await aggregator.run_once()
    assert result.events >= 4
    assert sum(count for _, count in result.ages) == result.events
    count = registry.get_sample_value("metering_aggregation_freshness_seconds_count")
    total = registry.get_sample_value("metering_aggregation_freshness_seconds_sum")
    assert count == result.events
    assert total is not None and 0 <= total < 60 * count


async def test_killed_pass_leaves_nothing_and_is_redone(
    db: asyncpg.Connection, migrated_database: str, event_store: EventStore, aggregator: Aggregator
) -> None:
    await aggregator.run_once()  # start from a caught-up watermark
    org = uuid.uuid4()
    events = Events(event_store, org)
    today = datetime.now(UTC)
    for n in range(3):
        await events.add("api_call", today.isoformat(), 5, event_id=f"k{n}")

    victim = await asyncpg.connect(migrated_database)
    transaction = victim.transaction(isolation="repeatable_read")
    await transaction.start()
    upper = await victim.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    lower = await victim.fetchval(
        "SELECT watermark_xid FROM aggregator_state WHERE name = 'usage' FOR UPDATE NOWAIT"
    )
    await victim.fetchrow("SELECT * FROM aggregate_new_events($1, $2)", lower, upper)  # half way
    assert await db.fetchval("SELECT pg_terminate_backend($1)", victim.get_server_pid())
    victim.terminate()

    assert await aggregates(db, org) == {}
    await aggregator.run_once()
    assert await aggregates(db, org) == {
        ("api_call", "day", today.date().isoformat()): ("15", 3),
        ("api_call", "month", today.date().replace(day=1).isoformat()): ("15", 3),
    }


async def test_reaggregate_is_idempotent_and_reconcile_catches_tampering(
    settings: Settings,
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
    aggregator: Aggregator,
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org, "free", "Europe/Berlin")
    events = Events(event_store, org)
    now = datetime.now(UTC)
    for n in range(6):
        await events.add("api_call", (now - timedelta(hours=30 * n)).isoformat(), n + 1)
    await events.add("storage_used", now.isoformat(), 7)
    await aggregator.run_once()
    expected = await aggregates(db, org)
    start, end = now - timedelta(days=10), now + timedelta(days=1)
    for _ in range(2):
        await aggregate_store.reaggregate("day", start, end, org)
        await aggregate_store.reaggregate("month", start, end, org)
        assert await aggregates(db, org) == expected

    first_day = (now - timedelta(days=40)).date()
    assert await aggregate_store.reconcile(first_day, now.date() + timedelta(days=1)) == []
    # The events span 150 hours, so one or two calendar months: every month row is tampered.
    tampered = await db.fetchval(
        "WITH t AS (UPDATE usage_aggregations SET value = value + 1 WHERE org_id = $1 AND "
        "event_type = 'api_call' AND period = 'month' RETURNING 1) SELECT count(*) FROM t",
        org,
    )
    assert tampered >= 1
    command = [sys.executable, "-m", "metering", "reconcile", "--from", first_day.isoformat()]
    result = subprocess.run(
        command,
        env=settings.child_environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"reconcile {first_day:%Y-%m}" in result.stderr  # progress, month by month
    assert str(org) in result.stdout and "api_call" in result.stdout
    assert f"{tampered} aggregates differ" in result.stderr
    assert result.stdout.count(str(org)) == tampered
    for only, status in ((org, 1), (uuid.uuid4(), 0)):
        scoped = subprocess.run(
            [*command, "--org", str(only)],
            env=settings.child_environment(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert scoped.returncode == status, scoped.stdout + scoped.stderr
        assert scoped.stdout.count(str(org)) == (tampered if status else 0)
    await aggregate_store.reaggregate("month", start, end, org)
    assert await aggregates(db, org) == expected
    assert await aggregate_store.reconcile(first_day, now.date() + timedelta(days=1)) == []


async def test_a_pass_stops_at_its_event_budget_and_the_next_ones_catch_up(
    db: asyncpg.Connection, event_store: EventStore, aggregate_store: AggregateStore
) -> None:
    """After an outage the aggregator catches up in passes of about its budget, each of
    which commits; a consumer transaction bigger than the budget is still taken whole."""
    await aggregate_store.run_pass(decide_crossings)  # what earlier tests left
    org = uuid.uuid4()
    await subscribe(db, org, "pro")
    now = datetime.now(UTC)
    for n in range(5):  # five consumer transactions of three events, quantity 10**n each
        await event_store.write_batch(
            [
                IncomingEvent(
                    UsageEvent(
                        id=f"b{n}-{k}",
                        type=EventType.API_CALL,
                        org_id=org,
                        quantity=Decimal(10**n),
                        occurred_at=now,
                    )
                )
                for k in range(3)
            ]
        )
    today, month = now.date().isoformat(), now.date().replace(day=1).isoformat()

    def totals(value: str, count: int) -> dict[tuple[str, str, str], tuple[str, int]]:
        return {
            ("api_call", "day", today): (value, count),
            ("api_call", "month", month): (value, count),
        }

    first = await aggregate_store.run_pass(decide_crossings, max_events=6)
    assert (first.events, first.caught_up) == (6, False)
    assert await aggregates(db, org) == totals("33", 6)
    second = await aggregate_store.run_pass(decide_crossings, max_events=2)
    assert (second.events, second.caught_up, second.from_xid) == (3, False, first.to_xid)
    assert await aggregates(db, org) == totals("333", 9)
    rest = await aggregate_store.run_pass(decide_crossings, max_events=1000)
    assert (rest.events, rest.caught_up, rest.from_xid) == (6, True, second.to_xid)
    assert await aggregates(db, org) == totals("33333", 15)
    assert await db.fetchval("SELECT count(*) FROM ingest_batches") == 0


async def test_reconcile_of_one_month_reads_the_events_of_zones_far_from_utc(
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
    aggregator: Aggregator,
) -> None:
    """A month's window reads only about that month's events (metering reconcile walks
    month by month), yet sees every event of its periods in the zones furthest from UTC:
    a local month starts 14 hours before UTC's in Kiritimati and ends 11 hours after it in
    Pago Pago."""
    now = datetime.now(UTC)
    orgs = {}
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):
        org = uuid.uuid4()
        await subscribe(db, org, "pro", zone)
        month = now.astimezone(ZoneInfo(zone)).replace(
            day=1, hour=0, minute=0, second=0, microsecond=0
        )
        events = Events(event_store, org)
        await events.add("api_call", month.isoformat(), 3)  # the month's first instant
        await events.add("api_call", (month - timedelta(seconds=1)).isoformat(), 5)
        orgs[org] = month
    await aggregator.run_once()

    for org, month in orgs.items():
        this_month = month.date()
        last_day = this_month - timedelta(days=1)
        previous_month = last_day.replace(day=1)
        next_month = (this_month + timedelta(days=32)).replace(day=1)
        assert await aggregates(db, org) == {
            ("api_call", "day", this_month.isoformat()): ("3", 1),
            ("api_call", "month", this_month.isoformat()): ("3", 1),
            ("api_call", "day", last_day.isoformat()): ("5", 1),
            ("api_call", "month", previous_month.isoformat()): ("5", 1),
        }

        async def differences(
            start: date, end: date, org: uuid.UUID = org
        ) -> list[tuple[str, str]]:
            found = await aggregate_store.reconcile(start, end)
            return [
                (r["period"], r["period_start"].isoformat()) for r in found if r["org_id"] == org
            ]

        assert await differences(this_month, next_month) == []
        assert await differences(previous_month, this_month) == []
        # the edge rows tampered, each is caught by its own month's window only
        await db.execute(
            "UPDATE usage_aggregations SET value = value + 1 WHERE org_id = $1 "
            "AND period = 'month' AND period_start = $2",
            org,
            this_month,
        )
        await db.execute(
            "UPDATE usage_aggregations SET event_count = event_count + 1 WHERE org_id = $1 "
            "AND period = 'day' AND period_start = $2",
            org,
            last_day,
        )
        assert await differences(this_month, next_month) == [("month", this_month.isoformat())]
        assert await differences(previous_month, this_month) == [("day", last_day.isoformat())]
        await db.execute(
            "UPDATE usage_aggregations SET value = value - 1 WHERE org_id = $1 "
            "AND period = 'month' AND period_start = $2",
            org,
            this_month,
        )
        await db.execute(
            "UPDATE usage_aggregations SET event_count = event_count - 1 WHERE org_id = $1 "
            "AND period = 'day' AND period_start = $2",
            org,
            last_day,
        )
        assert await differences(previous_month, next_month) == []


async def test_concurrent_recomputes_each_get_their_own_period_bounds(
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
    aggregator: Aggregator,
) -> None:
    """aggregate_usage keeps its period bounds in one shared table (aggregation_windows,
    migration 010): two recomputes started together, for organizations in different time
    zones, must each use their own bounds and both put every number right."""
    tokyo, new_york = uuid.uuid4(), uuid.uuid4()
    await subscribe(db, tokyo, "pro", "Asia/Tokyo")
    await subscribe(db, new_york, "pro", NEW_YORK)
    now = datetime.now(UTC)
    for org in (tokyo, new_york):
        events = Events(event_store, org)
        for n in range(8):
            await events.add("api_call", (now - timedelta(hours=7 * n)).isoformat(), n + 1)
    await aggregator.run_once()
    expected = {org: await aggregates(db, org) for org in (tokyo, new_york)}
    await db.execute(
        "UPDATE usage_aggregations SET value = value + 100 WHERE org_id = ANY($1::uuid[])",
        [tokyo, new_york],
    )
    start, end = now - timedelta(days=4), now + timedelta(days=1)
    await asyncio.gather(
        *(
            aggregate_store.reaggregate(period, start, end, org)
            for org in (tokyo, new_york)
            for period in ("day", "month")
        )
    )
    assert {org: await aggregates(db, org) for org in (tokyo, new_york)} == expected
    assert await db.fetchval("SELECT count(*) FROM aggregation_windows") == 0


async def test_reaggregate_writes_only_what_differs(
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
    aggregator: Aggregator,
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org, "pro", NEW_YORK)
    events = Events(event_store, org)
    now = datetime.now(UTC)
    user = uuid.uuid4()
    await events.add("api_call", now.isoformat(), 3)
    await events.add("user_active", now.isoformat(), user=user)
    await aggregator.run_once()
    expected = await aggregates(db, org)
    stamps = "SELECT period, event_type, updated_at FROM usage_aggregations WHERE org_id = $1"
    untouched = sorted(await db.fetch(stamps, org))
    start, end = now - timedelta(days=3), now + timedelta(days=1)

    assert await aggregate_store.reaggregate("day", start, end, org) == 2
    assert sorted(await db.fetch(stamps, org)) == untouched  # right already: nothing written

    yesterday = (now.astimezone(ZoneInfo(NEW_YORK)) - timedelta(days=1)).date()  # org's day
    await db.execute(  # rows with no events behind them: a wrong row and a phantom user
        "INSERT INTO usage_aggregations (org_id, event_type, period, period_start, value, "
        "event_count) VALUES ($1, 'api_call', 'day', $2, 5, 1)",
        org,
        yesterday,
    )
    await db.execute(
        "INSERT INTO usage_period_users VALUES ($1, 'user_active', 'day', $2, $3)",
        org,
        yesterday,
        uuid.uuid4(),
    )
    await db.execute(
        "UPDATE usage_aggregations SET event_count = 9 WHERE org_id = $1 AND period = 'day' "
        "AND event_type = 'api_call' AND period_start <> $2",
        org,
        yesterday,
    )
    await aggregate_store.reaggregate("day", start, end, org)
    assert await aggregates(db, org) == expected
    users = await db.fetch(
        "SELECT period, user_id FROM usage_period_users WHERE org_id = $1 ORDER BY period", org
    )
    assert [(r["period"], r["user_id"]) for r in users] == [("day", user), ("month", user)]


async def test_access_check_limits_unlimited_and_plan_change(
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
    aggregator: Aggregator,
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org, "free")
    events = Events(event_store, org)
    now = datetime.now(UTC)
    await events.add("record_created", (now - timedelta(days=40)).isoformat(), 60)  # last month
    await events.add("record_created", now.isoformat(), 35)  # lifetime 95
    await events.add("api_call", now.isoformat(), 400)
    await events.add("storage_used", now.isoformat(), 750_000_000)  # 0.75 GB
    await aggregator.run_once()

    records = await aggregate_store.check_access(org, "max_records", Decimal(5))
    assert (records["limit"], Decimal(str(records["used"])), records["allowed"]) == (100, 95, True)
    assert Decimal(str(records["remaining"])) == 5
    assert (await aggregate_store.check_access(org, "max_records", Decimal(6)))["allowed"] is False
    calls = await aggregate_store.check_access(org, "max_api_calls_per_month", Decimal(1))
    assert (Decimal(str(calls["used"])), Decimal(str(calls["remaining"]))) == (400, 600)
    storage = await aggregate_store.check_access(org, "max_storage_gb", Decimal(0))
    assert Decimal(str(storage["used"])) == Decimal("0.75") and storage["allowed"] is True
    flags = await aggregate_store.check_access(org, "features", Decimal(1))
    assert flags["flags"]["api_access"] is False

    # A plan change takes effect on the next check, without a restart.
    await subscribe(db, org, "pro")
    assert (await aggregate_store.check_access(org, "max_records", Decimal(6)))["allowed"] is True
    assert (await aggregate_store.check_access(org, "features", Decimal(1)))["flags"][
        "api_access"
    ] is True
    await db.execute(
        "UPDATE plan_features SET limit_value = 90 WHERE plan = 'pro' AND feature_key = 'max_records'"
    )
    try:
        assert (await aggregate_store.check_access(org, "max_records", Decimal(1)))[
            "allowed"
        ] is False
    finally:
        await db.execute(
            "UPDATE plan_features SET limit_value = 10000 WHERE plan = 'pro' AND feature_key = 'max_records'"
        )

    await subscribe(db, org, "enterprise")
    unlimited = await aggregate_store.check_access(org, "max_records", Decimal(10**12))
    assert (
        unlimited["limit"] == -1 and unlimited["unlimited"] is True and unlimited["allowed"] is True
    )
    assert unlimited["remaining"] is None

    await db.execute("UPDATE org_subscriptions SET seats_in_use = 3 WHERE org_id = $1", org)
    await subscribe(db, org, "pro")
    seats = await aggregate_store.check_access(org, "max_seats", Decimal(2))
    assert (seats["limit"], seats["used"], seats["allowed"]) == (5, 3, True)
    assert (await aggregate_store.check_access(org, "max_seats", Decimal(3)))["allowed"] is False

    with pytest.raises(asyncpg.NoDataFoundError):
        await aggregate_store.check_access(org, "max_unicorns", Decimal(1))


async def test_unknown_org_is_checked_against_free(aggregate_store: AggregateStore) -> None:
    result = await aggregate_store.check_access(uuid.uuid4(), "max_mau", Decimal(1))
    assert (result["plan"], result["limit"], result["used"], result["allowed"]) == (
        "free",
        100,
        0,
        True,
    )


async def test_quarter_hour_holding_a_local_midnight_is_split_exactly(
    db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    """The pass groups events by UTC quarter hour before finding their local day. Liberia
    kept UTC-0:44:30 until 1972, so its midnight fell at 00:44:30 UTC, inside the quarter
    00:30-00:45: those events must still land on their own local days."""
    await aggregator.run_once()
    org = uuid.uuid4()
    await subscribe(db, org, "pro", "Africa/Monrovia")
    events = Events(event_store, org)
    u1, u2 = uuid.uuid4(), uuid.uuid4()
    await events.add("api_call", "1971-07-01T00:31:00Z", 2)  # Jun 30 23:46:30 local
    await events.add("api_call", "1971-07-01T00:44:29Z", 3)  # Jun 30 23:59:59 local
    await events.add("api_call", "1971-07-01T00:44:31Z", 5)  # Jul 1 00:00:01 local
    await events.add("storage_used", "1971-07-01T00:40:00Z", 700)  # Jun 30
    await events.add("storage_used", "1971-07-01T00:44:00Z", 600)  # Jun 30, later: wins
    await events.add("storage_used", "1971-07-01T00:44:40Z", 100)  # Jul 1
    await events.add("user_active", "1971-07-01T00:35:00Z", user=u1)  # Jun 30
    await events.add("user_active", "1971-07-01T00:44:35Z", user=u1)  # Jul 1
    await events.add("user_active", "1971-07-01T00:44:50Z", user=u2)  # Jul 1
    result = await aggregator.run_once()
    assert result.events == 9
    assert await aggregates(db, org) == {
        ("api_call", "day", "1971-06-30"): ("5", 2),
        ("api_call", "day", "1971-07-01"): ("5", 1),
        ("api_call", "month", "1971-06-01"): ("5", 2),
        ("api_call", "month", "1971-07-01"): ("5", 1),
        ("storage_used", "day", "1971-06-30"): ("600", 2),
        ("storage_used", "day", "1971-07-01"): ("100", 1),
        ("storage_used", "month", "1971-06-01"): ("600", 2),
        ("storage_used", "month", "1971-07-01"): ("100", 1),
        ("user_active", "day", "1971-06-30"): ("1", 1),
        ("user_active", "day", "1971-07-01"): ("2", 2),
        ("user_active", "month", "1971-06-01"): ("1", 1),
        ("user_active", "month", "1971-07-01"): ("2", 2),
    }


async def test_limit_usage_of_a_pass_agrees_with_the_access_check(
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregator: Aggregator,
    aggregate_store: AggregateStore,
) -> None:
    """The usage a pass hands to `decide` (computed from the month rows the pass wrote,
    migration 012) is the usage usage_for_limit (what the access check shows) gives, for
    every kind of meter and for a past month; a limit below the lowest threshold is not
    handed over at all."""
    await aggregator.run_once()
    org = uuid.uuid4()
    await subscribe(db, org, "free", "UTC")  # low limits: every meter reaches 80%
    events = Events(event_store, org)
    now = datetime.now(UTC)
    month = now.date().replace(day=1)
    last_month = (month - timedelta(days=1)).replace(day=1)
    earlier = datetime.combine(last_month, datetime.min.time(), UTC) + timedelta(days=3)
    await events.add("api_call", now.isoformat(), 900)  # of 1,000
    await events.add("api_call", earlier.isoformat(), 50)  # 5% last month: below 80%
    await events.add("record_created", now.isoformat(), 30)
    await events.add("record_created", earlier.isoformat(), 55)  # lifetime: 85 of 100
    await events.add("automation_run", now.isoformat(), 10)  # of 10
    await events.add("schedule_executed", now.isoformat(), 8)  # of 10
    await events.add("ai_tokens_used", now.isoformat(), 9_000)  # of 10,000
    await events.add("storage_used", earlier.isoformat(), 2_500_000_000)  # 2.5 of 1 GB
    await events.add("storage_used", now.isoformat(), 900_000_000)  # 0.9 GB this month
    for _ in range(85):  # of 100
        await events.add("user_active", now.isoformat(), user=uuid.uuid4())
    seen: list[LimitUsage] = []

    def capture(usages: list[LimitUsage]) -> list[Crossing]:
        seen.extend(u for u in usages if u.org_id == org)
        return []

    await aggregate_store.run_pass(capture)
    found = {(u.feature_key, u.period_start): u.used for u in seen}
    assert len(seen) == len(found)  # the lifetime limit is one row
    assert found == {
        ("max_api_calls_per_month", month): 900,
        ("max_records", None): 85,
        ("max_automations", month): 10,
        ("max_schedules", month): 8,
        ("max_ai_tokens_per_month", month): 9_000,
        ("max_storage_gb", month): Decimal("0.9"),
        ("max_storage_gb", last_month): Decimal("2.5"),
        ("max_mau", month): 85,
    }  # max_api_calls_per_month of last month: 5%, nothing to notify
    for (feature, start), used in found.items():
        expected = await db.fetchval(
            "SELECT usage_for_limit($1, $2, $3)", org, feature, start or month
        )
        assert used == expected, feature


async def test_pass_gives_decide_the_usage_and_the_recorded_thresholds(
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregator: Aggregator,
    aggregate_store: AggregateStore,
) -> None:
    """What run_pass hands to `decide`: each touched limit that has reached the lowest
    threshold and can still notify, its usage as the access check computes it, and the
    thresholds recorded for that period, month and lifetime alike (aggregation_pass returns
    them as a bit mask)."""
    await aggregator.run_once()
    org = uuid.uuid4()
    await subscribe(db, org, "free", "UTC")
    events = Events(event_store, org)
    now = datetime.now(UTC)
    month = now.date().replace(day=1)
    last_month = (month - timedelta(days=1)).replace(day=1)
    record = (
        "INSERT INTO limit_notifications (id, org_id, feature_key, period, period_start, "
        "threshold_percent, used, limit_value, crossed_at, published_at) "
        "VALUES (gen_random_uuid(), $1, $2, $3, $4, $5, 1, 1, now(), now())"
    )
    await db.execute(record, org, "max_api_calls_per_month", "month", month, 100)
    await db.execute(record, org, "max_api_calls_per_month", "month", last_month, 80)
    await db.execute(record, org, "max_records", "lifetime", None, 80)
    for threshold in (80, 100):
        await db.execute(record, org, "max_automations", "month", month, threshold)
    await events.add("api_call", now.isoformat(), 850)  # 85% of the free plan's 1,000
    await events.add("record_created", now.isoformat(), 90)  # 90% of 100
    await events.add("automation_run", now.isoformat(), 10)  # 100% of 10
    await events.add("schedule_executed", now.isoformat(), 7)  # 70% of 10: below 80%
    seen: list[LimitUsage] = []

    def capture(usages: list[LimitUsage]) -> list[Crossing]:
        seen.extend(u for u in usages if u.org_id == org)
        return []

    result = await aggregate_store.run_pass(capture)
    assert result.events >= 3
    found = {(u.feature_key, u.period, u.period_start): u for u in seen}
    assert set(found) == {
        ("max_api_calls_per_month", "month", month),
        ("max_records", "lifetime", None),
    }  # max_automations: 80 and 100 recorded, nothing left; max_schedules: below 80%
    api_calls = found[("max_api_calls_per_month", "month", month)]
    assert api_calls.used == 850
    assert api_calls.notified == frozenset({100})  # last month's 80 is another period
    records = found[("max_records", "lifetime", None)]
    assert records.used == 90
    assert records.notified == frozenset({80})
    assert api_calls.limit == await db.fetchval(
        "SELECT limit_value FROM plan_features WHERE plan = 'free' "
        "AND feature_key = 'max_api_calls_per_month'"
    )


async def test_limits_below_the_lowest_threshold_are_left_out_as_decide_would(
    db: asyncpg.Connection,
) -> None:
    """touched_limit_usage hands over exactly the limits that thresholds_reached (the rule
    `decide` applies) says reach a threshold: exactly 80% does, just below does not, any use
    of a limit of 0 does, unlimited never does."""
    month = date(1999, 3, 1)
    cases = [  # plan, event type, value of the month row, the org's override if any
        ("free", "api_call", Decimal(800), None),  # 80% of 1,000
        ("free", "api_call", Decimal("799.99"), None),
        ("free", "automation_run", Decimal(8), None),  # 80% of 10
        ("free", "automation_run", Decimal("7.999"), None),
        ("free", "schedule_executed", Decimal("0.001"), None),  # limit set to 0 below
        ("free", "schedule_executed", Decimal(0), None),
        ("pro", "ai_tokens_used", Decimal(1_000_000), None),  # 100%
        ("enterprise", "api_call", Decimal(10**12), None),  # unlimited
        ("free", "storage_used", Decimal(800_000_000), None),  # 0.8 of 1 GB
        ("free", "storage_used", Decimal(799_999_999), None),
        # the organization's own limit and thresholds win over the plan's
        ("free", "api_call", Decimal(60), (100, [50, 150])),  # 60% of 100: 50 reached
        ("free", "api_call", Decimal(49), (100, [50, 150])),
        ("enterprise", "api_call", Decimal(900), (1000, None)),  # the plan's 80 and 100
        ("free", "api_call", Decimal(10**9), (-1, None)),  # unlimited by contract
    ]
    orgs = [uuid.uuid4() for _ in cases]
    transaction = db.transaction()
    await transaction.start()
    try:
        await db.execute(
            "UPDATE plan_features SET limit_value = 0 "
            "WHERE plan = 'free' AND feature_key = 'max_schedules'"
        )
        for org, (plan, event_type, _, override) in zip(orgs, cases, strict=True):
            await subscribe(db, org, plan, "UTC")
            if override is not None:
                await db.execute(
                    "INSERT INTO org_limit_overrides (org_id, feature_key, limit_value, "
                    "thresholds) SELECT $1, limit_key, $3, $4 FROM event_types "
                    "WHERE event_type = $2",
                    org,
                    event_type,
                    *override,
                )
        rows = await db.fetch(
            "SELECT * FROM touched_limit_usage($1, $2, $3, $4)",
            orgs,
            [event_type for _, event_type, _, _ in cases],
            [month] * len(cases),
            [value for _, _, value, _ in cases],
        )
        expected = set()
        for org, (plan, event_type, value, override) in zip(orgs, cases, strict=True):
            unit, key = await db.fetchrow(
                "SELECT limit_unit, limit_key FROM event_types WHERE event_type = $1", event_type
            )
            limit, thresholds = await db.fetchrow(
                "SELECT limit_value, thresholds FROM plan_features "
                "WHERE plan = $1 AND feature_key = $2",
                plan,
                key,
            )
            if override is not None:
                limit, thresholds = override[0], override[1] or thresholds
            if thresholds_reached(value / unit, limit, tuple(thresholds)):
                expected.add(org)
    finally:
        await transaction.rollback()
    assert {r["org_id"] for r in rows} == expected
    assert len(expected) == 7  # 800, 8, 0.001 of 0, 1,000,000, 0.8 GB, 60 of 100, 900
    assert all(r["notified"] == 0 for r in rows)
    assert {tuple(r["thresholds"]) for r in rows} == {(80, 100), (50, 150)}


def test_notified_mask_decodes_in_the_order_of_the_thresholds() -> None:
    assert notified_set(0) == frozenset()
    assert notified_set(0b01) == frozenset({80})
    assert notified_set(0b10) == frozenset({100})
    assert notified_set(0b11) == frozenset({80, 100})
    assert notified_set(0b101, (50, 80, 100)) == frozenset({50, 100})
