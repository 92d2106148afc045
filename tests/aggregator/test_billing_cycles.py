"""Billing cycles (contract section 8) on the real aggregator and PostgreSQL: the cycle
rule against its Python statement, an anchor on the 31st across February, cycles across a
daylight-saving change, crossings recorded per cycle, and the access check in the current
cycle through a plan change and an anchor change (recorded in the audit trail)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from aggregator.semantics import billing_cycle
from aggregator.service import Aggregator
from metering.storage.audit import AuditLog
from metering.storage.events import EventStore
from metering.storage.reads import SubscriptionStore
from tests.aggregator.test_meters import Stored, settle

pytestmark = pytest.mark.services


async def anchored(db: asyncpg.Connection, org: uuid.UUID, anchor: date, zone: str) -> None:
    await db.execute(
        "INSERT INTO org_subscriptions (org_id, plan, timezone, billing_anchor) "
        "VALUES ($1, 'free', $2, $3)",
        org,
        zone,
        anchor,
    )


async def crossings(db: asyncpg.Connection, org: uuid.UUID) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        "SELECT period, period_start, threshold_percent, used FROM limit_notifications "
        "WHERE org_id = $1 ORDER BY period_start, threshold_percent",
        org,
    )
    return [(r["period"], r["period_start"], r["threshold_percent"], r["used"]) for r in rows]


async def in_cycle(db: asyncpg.Connection, org: uuid.UUID, feature: str, start: date) -> Decimal:
    """usage_in_cycle of the org's cycle that starts on `start`."""
    end = await db.fetchval(
        "SELECT c.cycle_end FROM org_subscriptions s, billing_cycle(s.billing_anchor, $2) c "
        "WHERE s.org_id = $1",
        org,
        start,
    )
    used: Decimal = await db.fetchval(
        "SELECT usage_in_cycle($1, $2, $3, $4)", org, feature, start, end
    )
    return used


async def test_the_cycle_rule_in_sql_is_the_python_one(db: asyncpg.Connection) -> None:
    anchors = [date(2024, 1, d) for d in range(1, 32)]
    days = [date(2024, 1, 1) + timedelta(days=n) for n in range(0, 800, 3)]
    rows = await db.fetch(
        "SELECT a, d, c.cycle_start, c.cycle_end FROM unnest($1::date[]) a, unnest($2::date[]) d,"
        " billing_cycle(a, d) c",
        anchors,
        days,
    )
    assert len(rows) == len(anchors) * len(days)
    for row in rows:
        assert (row["cycle_start"], row["cycle_end"]) == billing_cycle(row["a"], row["d"])
        assert row["cycle_start"] <= row["d"] < row["cycle_end"]


async def test_an_anchor_on_the_31st_across_february(
    db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    """Worked by hand: cycles Dec 31-Jan 31, Jan 31-Feb 28, Feb 28-Mar 31, Mar 31-Apr 30;
    the free plan's 1,000 API calls, thresholds 80 and 100."""
    org = uuid.uuid4()
    await anchored(db, org, date(2025, 10, 31), "UTC")
    calls = Stored(event_store, "api_call")
    for at, quantity in [
        ("2026-01-30T12:00:00+00:00", 900),  # Dec 31 - Jan 31
        ("2026-01-31T00:30:00+00:00", 500),  # Jan 31 - Feb 28
        ("2026-02-27T23:59:00+00:00", 400),  # the same cycle: 900
        ("2026-02-28T00:00:00+00:00", 850),  # Feb 28 - Mar 31
        ("2026-03-30T23:59:59+00:00", 100),  # the same: 950
        ("2026-03-31T00:00:00+00:00", 1000),  # Mar 31 - Apr 30
    ]:
        await calls.add({"org": org, "at": datetime.fromisoformat(at), "quantity": quantity})
    await settle(aggregator)
    assert await crossings(db, org) == [
        ("cycle", date(2025, 12, 31), 80, Decimal(900)),
        ("cycle", date(2026, 1, 31), 80, Decimal(900)),
        ("cycle", date(2026, 2, 28), 80, Decimal(950)),
        ("cycle", date(2026, 3, 31), 80, Decimal(1000)),
        ("cycle", date(2026, 3, 31), 100, Decimal(1000)),
    ]
    for start, used in [
        (date(2025, 12, 31), 900),
        (date(2026, 1, 31), 900),
        (date(2026, 2, 28), 950),
        (date(2026, 3, 31), 1000),
    ]:
        assert await in_cycle(db, org, "max_api_calls_per_month", start) == used
    # calendar days and months unchanged
    months = {
        r["period_start"]: r["value"]
        for r in await db.fetch(
            "SELECT period_start, value FROM usage_aggregations WHERE org_id = $1 "
            "AND period = 'month'",
            org,
        )
    }
    assert months == {
        date(2026, 1, 1): 1400,
        date(2026, 2, 1): 1250,
        date(2026, 3, 1): 1100,
    }


async def test_cycles_across_a_daylight_saving_change(
    db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    """Berlin, anchored on the 29th: summer time starts on 2026-03-29 at 02:00 (UTC+1 ->
    +2), so the cycle from Mar 29 starts at 2026-03-28T23:00Z and ends at
    2026-04-28T22:00Z (local midnights)."""
    org = uuid.uuid4()
    await anchored(db, org, date(2026, 1, 29), "Europe/Berlin")
    calls = Stored(event_store, "api_call")
    for at, quantity in [
        ("2026-03-28T22:59:59+00:00", 10),  # 23:59:59 CET, Mar 28: Feb 28 - Mar 29
        ("2026-03-28T23:00:00+00:00", 20),  # 00:00 CET, Mar 29: Mar 29 - Apr 29
        ("2026-04-28T21:59:59+00:00", 40),  # 23:59:59 CEST, Apr 28: Mar 29 - Apr 29
        ("2026-04-28T22:00:00+00:00", 80),  # 00:00 CEST, Apr 29: Apr 29 - May 29
    ]:
        await calls.add({"org": org, "at": datetime.fromisoformat(at), "quantity": quantity})
    await settle(aggregator)
    assert await in_cycle(db, org, "max_api_calls_per_month", date(2026, 2, 28)) == 10
    assert await in_cycle(db, org, "max_api_calls_per_month", date(2026, 3, 29)) == 60
    assert await in_cycle(db, org, "max_api_calls_per_month", date(2026, 4, 29)) == 80
    assert await crossings(db, org) == []


async def test_the_access_check_counts_the_current_cycle_through_plan_and_anchor_changes(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    org = uuid.uuid4()
    today = datetime.now(UTC).date()
    anchor = today - timedelta(days=3)
    start, end = billing_cycle(anchor, today)
    await anchored(db, org, anchor, "UTC")
    calls = Stored(event_store, "api_call")
    people = Stored(event_store, "user_active")
    a, b = uuid.uuid4(), uuid.uuid4()
    midday = datetime.combine(start, datetime.min.time(), UTC) + timedelta(hours=12)
    await calls.add({"org": org, "at": midday - timedelta(days=1), "quantity": 300})
    await calls.add({"org": org, "at": midday, "quantity": 200})
    await people.add(
        {"org": org, "at": midday - timedelta(days=1), "user": a},  # the cycle before
        {"org": org, "at": midday, "user": a},
        {"org": org, "at": midday + timedelta(hours=1), "user": a},
        {"org": org, "at": midday + timedelta(hours=2), "user": b},
    )
    await settle(aggregator)

    async def check(feature: str = "max_api_calls_per_month") -> dict[str, Any]:
        raw = await db.fetchval("SELECT check_feature_access(NULL, $1, $2, 1)", feature, org)
        result: dict[str, Any] = json.loads(raw)
        return result

    first = await check()
    assert (first["period"], first["period_start"], first["period_end"]) == (
        "cycle",
        start.isoformat(),
        end.isoformat(),
    )
    assert (first["used"], first["limit"]) == (200, 1000)
    assert (await check("max_mau"))["used"] == 2  # distinct over the cycle's days
    assert (await check("max_records"))["period"] == "month"  # lifetime: no cycle

    subscriptions = SubscriptionStore(pool)
    await subscriptions.put(
        org, "pro", "active", 1, 0, "UTC", anchor, set_anchor=False, actor="ops"
    )
    assert ((await check())["used"], (await check())["limit"]) == (200, 100_000)
    earlier = start - timedelta(days=1)
    await subscriptions.put(
        org, "pro", "active", 1, 0, "UTC", earlier, set_anchor=True, actor="ops"
    )
    moved = await check()
    assert (moved["period_start"], moved["used"]) == (earlier.isoformat(), 500)
    await subscriptions.put(org, "pro", "active", 1, 0, "UTC", None, set_anchor=True, actor="ops")
    calendar = await check()
    assert (calendar["period"], calendar["period_start"]) == (
        "month",
        today.replace(day=1).isoformat(),
    )
    trail = [(e.action, e.details) for e in reversed(await AuditLog(pool).entries(org_id=org))]
    assert trail == [
        ("subscription.billing_anchor", {"old": str(anchor), "new": str(earlier)}),
        ("subscription.billing_anchor", {"old": str(earlier), "new": None}),
    ]
