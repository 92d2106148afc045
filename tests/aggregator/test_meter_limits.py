"""Limits through meters (issue 37, items 6 and 7): a meter with a `limit_key` is what the
access check and the crossings count, and every number of the access check is exact."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import httpx
import pytest

from aggregator.service import Aggregator
from metering.meters.definition import MeterSpec
from metering.meters.store import MeterStore
from metering.models import EventType, UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from metering.storage.reads import ReadStore
from tests.conftest import Server

pytestmark = pytest.mark.services
NOW = datetime.now(UTC).replace(microsecond=0)


async def store(events: EventStore, kind: str, org: uuid.UUID, *items: dict[str, object]) -> None:
    await events.write_batch(
        [
            IncomingEvent(
                UsageEvent(
                    id=f"e{uuid.uuid4().hex}",
                    type=kind,
                    org_id=org,
                    quantity=Decimal(str(item.get("quantity", 1))),
                    occurred_at=NOW - timedelta(minutes=n),
                    metadata=item.get("metadata"),  # type: ignore[arg-type]
                )
            )
            for n, item in enumerate(items)
        ]
    )


async def settle(aggregator: Aggregator) -> None:
    for _ in range(1000):
        result = await aggregator.run_once(publish=False)
        if result.events == 0 and not aggregator.backfilling:
            return
    raise AssertionError("never settled")


async def test_a_meter_with_a_limit_key_is_what_the_check_and_the_crossings_count(
    pool: asyncpg.Pool, db: asyncpg.Connection, event_store: EventStore, aggregator: Aggregator
) -> None:
    tag = uuid.uuid4().hex[:8]
    feature, kind = f"max_gpu_minutes_{tag}", f"gpu_{tag}"
    # an operator adds a feature to the plans, then the meter that counts it
    await db.execute(
        "INSERT INTO plan_features (plan, feature_key, limit_value) "
        "SELECT plan, $1, CASE plan WHEN 'free' THEN 10 ELSE -1 END FROM plans",
        feature,
    )
    try:
        await MeterStore(pool).create(
            MeterSpec.parse(
                {
                    "key": f"gpu_minutes_{tag}",
                    "event_type": kind,
                    "aggregation": "sum",
                    "value": "metadata.minutes",
                    "limit_key": feature,
                }
            )
        )
        await settle(aggregator)
        org = uuid.uuid4()
        reads = ReadStore(pool)
        await store(
            event_store, kind, org, {"metadata": {"minutes": "2.25"}}, {"metadata": {"minutes": 6}}
        )
        await settle(aggregator)
        check = await reads.check(org, feature, Decimal(1))
        assert check is not None
        assert (check["limit"], check["used"], check["remaining"]) == (
            10,
            Decimal("8.25"),
            Decimal("1.75"),
        )
        assert check["allowed"] is True
        assert (await reads.check(org, feature, Decimal(2)))["allowed"] is False  # type: ignore[index]
        crossed = await db.fetch(
            "SELECT threshold_percent, used FROM limit_notifications WHERE org_id = $1", org
        )
        assert [(r["threshold_percent"], r["used"]) for r in crossed] == [(80, Decimal("8.25"))]
        await store(event_store, kind, org, {"metadata": {"minutes": "1.75"}})
        await settle(aggregator)
        crossed = await db.fetch(
            "SELECT threshold_percent, used FROM limit_notifications WHERE org_id = $1 "
            "ORDER BY threshold_percent",
            org,
        )
        assert [(r["threshold_percent"], r["used"]) for r in crossed] == [
            (80, Decimal("8.25")),
            (100, Decimal("10")),
        ]
    finally:  # the plan table is shared by every test: leave it as the contract seeds it
        await db.execute("DELETE FROM plan_features WHERE feature_key = $1", feature)
        await db.execute(
            "UPDATE meters SET status = 'archived' WHERE key = $1", f"gpu_minutes_{tag}"
        )


async def test_the_access_check_answers_exact_numbers(  # type: ignore[no-untyped-def]
    server: Server,
    make_key,
    pool: asyncpg.Pool,
    event_store: EventStore,
    aggregator: Aggregator,
) -> None:
    org = uuid.uuid4()
    await store(event_store, EventType.STORAGE_USED, org, {"quantity": 123456789})
    await settle(aggregator)
    reader = {"Authorization": f"Bearer {await make_key('read', org=org)}"}
    async with httpx.AsyncClient(base_url=server.url, headers=reader) as client:
        response = await client.get(f"/v1/orgs/{org}/features/max_storage_gb")
        entitlements = await client.get(f"/v1/orgs/{org}/entitlements")
    assert response.status_code == 200
    # 123456789 bytes in GB (unit 10^9), exactly: no float on the way
    exact = json.loads(response.text, parse_float=Decimal)
    assert (exact["used"], exact["remaining"]) == (Decimal("0.123456789"), Decimal("0.876543211"))
    assert '"used": 0.123456789' in response.text
    storage = next(
        f
        for f in json.loads(entitlements.text, parse_float=Decimal)["features"]
        if f["feature_key"] == "max_storage_gb"
    )
    assert storage["used"] == Decimal("0.123456789")
