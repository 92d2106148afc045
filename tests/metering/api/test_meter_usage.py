"""`GET /v1/orgs/{org}/meters/{key}/usage` on the real services, held to the reference:
hour, day and month windows in the organization's zone (a DST day included) and in
another zone, group_by subsets, filters, pages and CSV, and refused ranges."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry

from aggregator.semantics import StoredEvent, expected_meter_usage
from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from metering.config import Settings
from metering.meters.definition import MeterSpec
from metering.meters.store import MeterStore
from metering.meters.usage_store import MeterUsageStore
from metering.meters.windows import InvalidUsageQuery
from metering.metrics import AggregatorMetrics
from metering.models import UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.conftest import Server

pytestmark = pytest.mark.services


async def settle(aggregator: Aggregator) -> None:
    for _ in range(1000):
        result = await aggregator.run_once(publish=False)
        if result.events == 0 and not aggregator.backfilling:
            return
    raise AssertionError("the aggregator never settled")


@pytest.fixture
async def history(
    settings: Settings, migrated_database: str
) -> tuple[uuid.UUID, dict[str, MeterSpec], list[StoredEvent], datetime]:
    """An org in Europe/Berlin with 20 days of events across the end of summer time in
    Europe (25 October 2026: a 25-hour day) and in New York (1 November)."""
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=3)
    assert pool is not None
    try:
        kind = f"t_{uuid.uuid4().hex[:10]}"
        tag = kind[2:]
        meters = {
            kind: MeterSpec.parse(
                {
                    "key": f"s_{tag}",
                    "event_type": kind,
                    "aggregation": "sum",
                    "group_by": ["model", "region"],
                }
            ),
            "unique": MeterSpec.parse(
                {
                    "key": f"u_{tag}",
                    "event_type": kind,
                    "aggregation": "unique_count",
                    "group_by": ["model", "region"],
                }
            ),
            "latest": MeterSpec.parse(
                {
                    "key": f"l_{tag}",
                    "event_type": kind,
                    "aggregation": "latest",
                    "group_by": ["region"],
                }
            ),
        }
        for spec in meters.values():
            await MeterStore(pool).create(spec)
        org = uuid.uuid4()
        await pool.execute(
            "INSERT INTO org_subscriptions (org_id, plan, timezone) VALUES ($1, 'free', $2)",
            org,
            "Europe/Berlin",
        )
        now = datetime.now(UTC).replace(microsecond=0)
        start = now - timedelta(days=45)  # across the end of summer time (25 and 1 Nov)
        users = [uuid.uuid4() for _ in range(4)]
        stored = []
        batch = []
        for n in range(400):
            event = UsageEvent(
                id=f"e{n}",
                type=kind,
                org_id=org,
                user_id=users[n % 4],
                quantity=Decimal(n % 7),
                occurred_at=start + timedelta(minutes=71 * n),
                metadata={"model": ["a", "b", "c"][n % 3], "region": ["eu", "us"][n % 2]},
            )
            batch.append(IncomingEvent(event))
            stored.append(
                StoredEvent(org, event.occurred_at, event.quantity, event.user_id, event.metadata)
            )
        await EventStore(pool).write_batch(batch)
        aggregator = Aggregator(
            settings, AggregateStore(pool), None, AggregatorMetrics(CollectorRegistry())
        )
        await settle(aggregator)
        return org, {k: v for k, v in meters.items()}, stored, start
    finally:
        await pool.close()


def expected(
    spec: MeterSpec,
    events: list[StoredEvent],
    window: str,
    zone: str,
    group_by: list[str],
    start: datetime,
    end: datetime,
) -> dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[str, int]]:
    narrowed = MeterSpec.parse(
        {
            "key": spec.key,
            "event_type": spec.event_type,
            "aggregation": spec.aggregation.value,
            "group_by": group_by,
        }
    )
    rows, _ = expected_meter_usage(narrowed, events, {}, window, zone)
    result = {}
    for (_, dims, _, instant), (value, count) in rows.items():
        if start <= instant < end:
            shown = instant.astimezone(ZoneInfo(zone)).isoformat()
            result[(shown, dims)] = (format(value.normalize(), "f"), count)
    return result


def answered(
    body: dict[str, Any],
) -> dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[str, int]]:
    return {
        (row["window_start"], tuple(row["dimensions"].items())): (row["value"], row["event_count"])
        for row in body["rows"]
    }


@pytest.mark.parametrize(
    ("meter", "window", "zone", "group_by"),
    [
        ("sum", "day", None, ["model", "region"]),
        ("sum", "day", None, ["region"]),
        ("sum", "month", None, []),
        ("sum", "hour", None, ["model"]),
        ("sum", "day", "America/New_York", ["region"]),
        ("unique", "day", None, ["model"]),
        ("unique", "month", None, []),
        ("unique", "hour", "Asia/Kolkata", []),
        ("latest", "day", None, []),
        ("latest", "hour", None, ["region"]),
    ],
)
async def test_usage_equals_the_reference(  # type: ignore[no-untyped-def]
    server: Server,
    make_key,
    history: tuple[uuid.UUID, dict[str, MeterSpec], list[StoredEvent], datetime],
    meter: str,
    window: str,
    zone: str | None,
    group_by: list[str],
) -> None:
    org, meters, events, start = history
    spec = meters[meter] if meter != "sum" else next(iter(meters.values()))
    reader = {"Authorization": f"Bearer {await make_key('read', org=org)}"}
    where = zone or "Europe/Berlin"
    span = timedelta(days=6) if window == "hour" or zone else timedelta(days=25)
    first = (start + timedelta(days=2)).astimezone(ZoneInfo(where)).date()
    last = first + span
    if window == "month":  # whole months, the whole history
        first = start.astimezone(ZoneInfo(where)).date().replace(day=1)
        last = (first + timedelta(days=62)).replace(day=1)
    params: dict[str, Any] = {
        "window": window,
        "from": first.isoformat(),
        "to": last.isoformat(),
        "group_by": ",".join(group_by),
    }
    if zone:
        params["tz"] = zone
    async with httpx.AsyncClient(base_url=server.url, headers=reader, timeout=30) as client:
        response = await client.get(f"/v1/orgs/{org}/meters/{spec.key}/usage", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["source"] == ("events" if window == "hour" or zone else "rollups")
    lo = datetime.combine(first, datetime.min.time(), ZoneInfo(where))
    hi = datetime.combine(last, datetime.min.time(), ZoneInfo(where))
    assert (body["from"], body["to"]) == (lo.isoformat(), hi.isoformat())
    want = expected(spec, events, window, where, group_by, lo, hi)
    assert want
    assert answered(body) == want


async def test_filters_pages_csv_and_refusals(  # type: ignore[no-untyped-def]
    server: Server,
    make_key,
    history: tuple[uuid.UUID, dict[str, MeterSpec], list[StoredEvent], datetime],
) -> None:
    org, meters, _, start = history
    spec = next(iter(meters.values()))
    reader = {"Authorization": f"Bearer {await make_key('read', org=org)}"}
    path = f"/v1/orgs/{org}/meters/{spec.key}/usage"
    first = (start + timedelta(days=1)).astimezone(ZoneInfo("Europe/Berlin")).date()
    span = {"from": first.isoformat(), "to": (first + timedelta(days=10)).isoformat()}
    async with httpx.AsyncClient(base_url=server.url, headers=reader, timeout=30) as client:
        everything = (await client.get(path, params={**span, "group_by": "model"})).json()
        only_a = (
            await client.get(path, params={**span, "group_by": "model", "filter[model]": "a"})
        ).json()
        assert answered(only_a) == {
            k: v for k, v in answered(everything).items() if dict(k[1])["model"] == "a"
        }
        pages: list[dict[str, Any]] = []
        cursor = None
        while True:
            params = {**span, "group_by": "model", "limit": 4}
            if cursor:
                params["cursor"] = cursor
            page = (await client.get(path, params=params)).json()
            pages.extend(page["rows"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == everything["rows"]
        as_csv = await client.get(
            path, params={**span, "group_by": "model"}, headers={"Accept": "text/csv"}
        )
        assert as_csv.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [(r["window_start"], r["value"]) for r in table] == [
            (r["window_start"], r["value"]) for r in everything["rows"]
        ]
        too_long = await client.get(
            path, params={"window": "hour", "from": span["from"], "to": span["to"]}
        )
        assert too_long.status_code == 400 and "at most 7 days" in too_long.json()["reason"]
        unknown_dimension = await client.get(path, params={"group_by": "colour"})
        assert unknown_dimension.status_code == 400
        assert unknown_dimension.json()["field"] == "group_by"
        bad_zone = await client.get(path, params={"tz": "Mars/Olympus"})
        assert bad_zone.status_code == 400 and bad_zone.json()["field"] == "tz"
        bad_date = await client.get(path, params={"from": "yesterday"})
        assert bad_date.status_code == 400 and bad_date.json()["field"] == "from"
        missing = await client.get(f"/v1/orgs/{org}/meters/no_such_meter/usage")
        assert missing.status_code == 404
        seeded = await client.get(f"/v1/orgs/{org}/meters/api_call/usage")
        assert seeded.status_code == 200 and seeded.json()["rows"] == []


async def test_a_raw_range_with_too_many_events_is_refused_naming_the_largest_to(
    migrated_database: str,
    history: tuple[uuid.UUID, dict[str, MeterSpec], list[StoredEvent], datetime],
) -> None:
    org, meters, events, start = history
    spec = next(iter(meters.values()))
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=1)
    assert pool is not None
    try:
        store = MeterUsageStore(pool, max_raw_events=10)
        first = start.replace(minute=0, second=0) + timedelta(hours=2)  # an hour boundary
        with pytest.raises(InvalidUsageQuery) as refused:
            await store.usage(
                org,
                spec.key,
                window="hour",
                tz=None,
                start=first.isoformat(),
                end=(first + timedelta(days=2)).isoformat(),
                group_by=[],
                filters={},
                now=datetime.now(UTC),
            )
        # events every 71 minutes: the range must stop at the hour holding the 11th
        in_range = sorted(e.occurred_at for e in events if e.occurred_at >= first)
        largest = in_range[10].replace(minute=0, second=0)
        assert refused.value.field == "to"
        shown = largest.astimezone(ZoneInfo("Europe/Berlin")).isoformat()  # the org's zone
        assert f"the largest `to` for this `from` is {shown}" in str(refused.value)
        allowed = await store.usage(
            org,
            spec.key,
            window="hour",
            tz=None,
            start=first.isoformat(),
            end=largest.isoformat(),
            group_by=[],
            filters={},
            now=datetime.now(UTC),
        )
        assert sum(r.event_count for r in allowed.rows) <= 10
    finally:
        await pool.close()
