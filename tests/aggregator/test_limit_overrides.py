"""Limits shaped per organization (contract section 8) on the real aggregator: an override
wins over the plan, a soft limit never refuses and reports its overage, each limit's own
thresholds are crossed and recorded once per period, a limit lowered mid-period (by an
override or a plan change) notifies what it now crosses at the next pass, -1 is unlimited,
and every change is audited with its old and new value."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from aggregator.service import Aggregator
from metering.limits.overrides import OverrideStore, UnknownLimit
from metering.storage.audit import AuditLog
from metering.storage.events import EventStore
from tests.aggregator.conftest import subscribe
from tests.aggregator.test_meters import Stored, settle

pytestmark = pytest.mark.services

NOW = datetime.now(UTC).replace(microsecond=0)
FEATURE = "max_api_calls_per_month"


async def access(db: asyncpg.Connection, org: uuid.UUID, requested: int = 1) -> dict[str, Any]:
    raw = await db.fetchval(
        "SELECT check_feature_access(NULL, $1, $2, $3)", FEATURE, org, Decimal(requested)
    )
    result: dict[str, Any] = json.loads(raw)
    return result


async def recorded(db: asyncpg.Connection, org: uuid.UUID) -> list[int]:
    rows = await db.fetch(
        "SELECT threshold_percent FROM limit_notifications WHERE org_id = $1 "
        "AND feature_key = $2 ORDER BY threshold_percent",
        org,
        FEATURE,
    )
    return [r["threshold_percent"] for r in rows]


async def test_an_override_with_its_own_thresholds_soft_then_lowered_then_removed(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org, "free")
    calls = Stored(event_store, "api_call")
    await calls.add({"org": org, "at": NOW, "quantity": 500})
    await settle(aggregator)
    assert await recorded(db, org) == []  # 50% of the plan's 1,000
    overrides = OverrideStore(pool, AuditLog(pool))

    await overrides.set(
        org, FEATURE, limit=600, soft=True, thresholds=[50, 80, 100, 150], actor="ops"
    )
    check = await access(db, org, 200)
    assert (check["limit"], check["soft"], check["source"], check["allowed"]) == (
        600,
        True,
        "override",
        True,
    )
    assert Decimal(str(check["overage"])) == 100  # 500 + 200 - 600
    assert check["thresholds"] == [50, 80, 100, 150]
    await settle(aggregator)  # no new event: the re-check crosses 50 and 80 (500 of 600)
    assert await recorded(db, org) == [50, 80]

    await calls.add({"org": org, "at": NOW, "quantity": 400})  # 900: 150%
    await settle(aggregator)
    assert await recorded(db, org) == [50, 80, 100, 150]
    await settle(aggregator)
    assert await recorded(db, org) == [50, 80, 100, 150]  # once per period

    # lowered mid-period and hard: refused; every threshold was notified already
    await overrides.set(org, FEATURE, limit=300, soft=False, thresholds=None, actor="ops")
    check = await access(db, org)
    assert (check["limit"], check["soft"], check["allowed"]) == (300, False, False)
    assert "overage" not in check and check["thresholds"] == [80, 100]
    await settle(aggregator)
    assert await recorded(db, org) == [50, 80, 100, 150]

    await overrides.set(org, FEATURE, limit=-1, soft=False, thresholds=None, actor="ops")
    check = await access(db, org, 10**9)
    assert (check["limit"], check["unlimited"], check["allowed"]) == (-1, True, True)

    removed = await overrides.unset(org, FEATURE, actor="ops")
    assert removed is not None and removed.limit == -1
    check = await access(db, org, 100)
    assert (check["limit"], check["source"], check["allowed"]) == (1000, "plan", True)
    assert (await access(db, org, 101))["allowed"] is False
    assert await overrides.unset(org, FEATURE, actor="ops") is None

    trail = list(reversed(await AuditLog(pool).entries(org_id=org)))
    assert [(e.action, e.actor) for e in trail] == [
        ("limits.set", "ops"),
        ("limits.set", "ops"),
        ("limits.set", "ops"),
        ("limits.unset", "ops"),
    ]
    assert trail[0].details["old"] is None and trail[0].details["new"]["limit"] == 600
    assert (trail[1].details["old"]["limit"], trail[1].details["new"]["limit"]) == (600, 300)
    assert trail[3].details["new"] is None
    with pytest.raises(UnknownLimit):
        await overrides.set(org, "features", limit=1, soft=False, thresholds=None, actor="x")
    with pytest.raises(asyncpg.CheckViolationError):
        await overrides.set(org, FEATURE, limit=1, soft=False, thresholds=[0], actor="x")


async def test_a_lower_plan_notifies_what_it_now_crosses(
    db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org, "pro")
    calls = Stored(event_store, "api_call")
    await calls.add({"org": org, "at": NOW, "quantity": 850})
    await settle(aggregator)
    assert await recorded(db, org) == []  # 850 of 100,000
    await db.execute("UPDATE org_subscriptions SET plan = 'free' WHERE org_id = $1", org)
    await settle(aggregator)
    assert await recorded(db, org) == [80]  # 850 of 1,000, without a new event
    row = await db.fetchrow(
        "SELECT used, limit_value FROM limit_notifications WHERE org_id = $1", org
    )
    assert (row["used"], row["limit_value"]) == (Decimal(850), 1000)
