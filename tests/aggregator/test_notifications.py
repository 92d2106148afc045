"""Threshold crossings on the real Kafka: once per (org, feature, period, threshold),
across aggregator restarts and re-aggregation; never for unlimited plans; late events
notify for their own (past) period."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from aggregator.service import Aggregator
from metering.config import Settings
from metering.metrics import AggregatorMetrics
from metering.storage.aggregates import AggregateStore
from metering.storage.events import EventStore
from tests.aggregator.conftest import Events, subscribe
from tests.conftest import ConsumerProcess, async_wait_for, read_topic

pytestmark = pytest.mark.services


async def publishing_aggregator(
    settings: Settings, store: AggregateStore
) -> tuple[Aggregator, AIOKafkaProducer]:
    """A fresh aggregator instance, as after a restart."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, acks="all", enable_idempotence=True
    )
    await producer.start()
    return Aggregator(settings, store, producer, AggregatorMetrics(CollectorRegistry())), producer


async def test_crossings_once_across_restart_and_reaggregation(
    settings: Settings,
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
) -> None:
    org, rich = uuid.uuid4(), uuid.uuid4()
    await subscribe(db, org, "free")
    await subscribe(db, rich, "enterprise")
    events, rich_events = Events(event_store, org), Events(event_store, rich)
    now = datetime.now(UTC)
    month_start = now.date().replace(day=1)
    last_month = (month_start - timedelta(days=1)).replace(day=1)

    aggregator, producer = await publishing_aggregator(settings, aggregate_store)
    await events.add("api_call", now.isoformat(), 850)  # 85% of 1000
    await rich_events.add("api_call", now.isoformat(), 10**9)  # unlimited: never
    await aggregator.run_once()
    await producer.stop()

    aggregator, producer = await publishing_aggregator(settings, aggregate_store)  # "restart"
    await events.add("api_call", now.isoformat(), 100)  # 95%: 80 already sent
    await aggregator.run_once()
    await events.add("api_call", now.isoformat(), 60)  # 101%: 100 crossed
    await aggregator.run_once()
    await aggregate_store.reaggregate(
        "month", now - timedelta(days=1), now + timedelta(days=1), org
    )
    await aggregate_store.reaggregate("day", now - timedelta(days=1), now + timedelta(days=1), org)
    await aggregator.run_once()
    # a late event pushes last month over 80%: notifies for last month. Noon of last month's
    # last day is in last month on every date (now - 30 days is not, on the 31st).
    late = datetime.combine(month_start, datetime.min.time(), UTC) - timedelta(hours=12)
    await events.add("api_call", late.isoformat(), 900)
    await aggregator.run_once()
    await producer.stop()

    records = await read_topic(settings, settings.limits_topic, expected=3, timeout=15)
    messages = [json.loads(m.value) for m in records]
    mine = sorted(
        (m["period_start"], m["threshold_percent"]) for m in messages if m["org_id"] == str(org)
    )
    assert mine == sorted(
        [
            (month_start.isoformat(), 80),
            (month_start.isoformat(), 100),
            (last_month.isoformat(), 80),
        ]
    )
    assert not [m for m in messages if m["org_id"] == str(rich)]
    assert len({m["id"] for m in messages}) == len(messages)
    hundred = next(m for m in messages if m["org_id"] == str(org) and m["threshold_percent"] == 100)
    assert (hundred["feature_key"], hundred["limit"], hundred["used"]) == (
        "max_api_calls_per_month",
        1000,
        "1010",
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM limit_notifications WHERE org_id = $1 AND published_at IS NULL",
            org,
        )
        == 0
    )


async def test_event_reaches_access_check_through_both_processes(
    settings: Settings,
    producer: AIOKafkaProducer,
    migrated_database: str,
    start_consumer: Callable[..., ConsumerProcess],
    start_aggregator: Callable[[], int],
) -> None:
    """Kafka -> consumer -> usage_events -> aggregator -> check_feature_access, for real."""
    org = uuid.uuid4()
    start_consumer()
    start_aggregator()
    for n in range(3):
        body = {
            "id": f"r{n}",
            "type": "record_created",
            "org_id": str(org),
            "quantity": 30,
            "occurred_at": datetime.now(UTC).isoformat(),
        }
        await producer.send_and_wait(
            settings.events_topic, json.dumps(body).encode(), key=str(org).encode()
        )
    conn = await asyncpg.connect(migrated_database)
    try:

        async def used() -> bool:
            raw = await conn.fetchval("SELECT check_feature_access(NULL, 'max_records', $1)", org)
            result = json.loads(raw)
            return bool(result["used"] == 90 and result["remaining"] == 10 and result["allowed"])

        await async_wait_for(used, 30, "the access check to see 90 of 100 records")
    finally:
        await conn.close()
    # the topic may also carry other tests' pending crossings: look at this org's only
    letters = await read_topic(settings, settings.limits_topic, expected=10**6, timeout=5)
    mine = [json.loads(m.value) for m in letters if m.key == str(org).encode()]
    assert [(m["feature_key"], m["threshold_percent"]) for m in mine] == [("max_records", 80)]
