"""Threshold crossings on the real Kafka: once per (org, feature, period, threshold),
across aggregator restarts and re-aggregation; never for unlimited plans; late events
notify for their own (past) period."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from aggregator.limits import Crossing
from aggregator.publisher import CrossingPublisher
from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from metering.config import Settings
from metering.devenv.services import DevServices
from metering.errors import AggregatorNotActive
from metering.metrics import AggregatorMetrics
from metering.storage.events import EventStore
from tests.aggregator.conftest import Events, aggregate_process, says, subscribe
from tests.conftest import (
    ROOT,
    ConsumerProcess,
    async_wait_for,
    read_to_end,
    read_topic,
)

pytestmark = pytest.mark.services


async def publishing_aggregator(
    settings: Settings, store: AggregateStore
) -> tuple[Aggregator, CrossingPublisher]:
    """A fresh aggregator instance, as after a restart."""
    publisher = CrossingPublisher(settings)
    metrics = AggregatorMetrics(CollectorRegistry())
    return Aggregator(settings, store, publisher, metrics), publisher


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

    aggregator, publisher = await publishing_aggregator(settings, aggregate_store)
    await events.add("api_call", now.isoformat(), 850)  # 85% of 1000
    await rich_events.add("api_call", now.isoformat(), 10**9)  # unlimited: never
    await aggregator.run_once()
    await publisher.stop()

    aggregator, publisher = await publishing_aggregator(settings, aggregate_store)  # "restart"
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
    await publisher.stop()

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


async def recorded_crossing(
    settings: Settings, db: asyncpg.Connection, event_store: EventStore, store: AggregateStore
) -> Crossing:
    """A new org at 85% of its api calls, its 80% crossing recorded and not published."""
    org = uuid.uuid4()
    await subscribe(db, org, "free")
    await Events(event_store, org).add("api_call", datetime.now(UTC).isoformat(), 850)
    await Aggregator(settings, store, None, AggregatorMetrics(CollectorRegistry())).run_once()
    mine = [c for c in await store.unpublished(10**6) if c.org_id == org]
    assert [c.threshold_percent for c in mine] == [80]
    return mine[0]


async def messages_of(settings: Settings, org: uuid.UUID) -> list[dict[str, object]]:
    records = await read_to_end(settings, settings.limits_topic)
    return [json.loads(r.value) for r in records if r.key == str(org).encode()]


@pytest.fixture
async def crossing(
    settings: Settings,
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
) -> Crossing:
    return await recorded_crossing(settings, db, event_store, aggregate_store)


async def test_a_crossing_committed_before_a_crash_is_not_sent_again(
    settings: Settings, db: asyncpg.Connection, aggregate_store: AggregateStore, crossing: Crossing
) -> None:
    crashed = CrossingPublisher(settings)
    await crashed.start()
    await crashed.publish([crossing])  # committed on Kafka; "dies" before marking it published

    aggregator, publisher = await publishing_aggregator(settings, aggregate_store)
    await aggregator.run_once()  # fences the crashed one, reads the topic back, marks
    await publisher.stop()
    await crashed.stop()

    assert [m["id"] for m in await messages_of(settings, crossing.org_id)] == [str(crossing.id)]
    published = "SELECT published_at IS NOT NULL FROM limit_notifications WHERE id = $1"
    assert await db.fetchval(published, crossing.id)


async def test_a_fenced_aggregator_publishes_nothing(
    settings: Settings, aggregate_store: AggregateStore, crossing: Crossing
) -> None:
    older = CrossingPublisher(settings)
    await older.start()
    aggregator, publisher = await publishing_aggregator(settings, aggregate_store)
    await aggregator.run_once()  # its publisher starts after the older one: fences it
    with pytest.raises(AggregatorNotActive, match="fenced"):
        await older.publish([crossing])
    await older.stop()
    await publisher.stop()

    assert [m["id"] for m in await messages_of(settings, crossing.org_id)] == [str(crossing.id)]


async def test_one_aggregator_leads_the_other_stands_by_and_takes_over(
    settings: Settings,
    db: asyncpg.Connection,
    event_store: EventStore,
    migrated_database: str,
    tmp_path: Path,
) -> None:
    org = uuid.uuid4()
    await subscribe(db, org, "free")
    events = Events(event_store, org)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = aggregate_process(settings, first_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        await async_wait_for(lambda: says(first_log, "leading"), 30, "the first to lead")
        second = aggregate_process(settings, second_log)
        await async_wait_for(lambda: says(second_log, "standing by"), 30, "the second to stand by")
        once = subprocess.run(
            [sys.executable, "-m", "metering", "aggregate", "--once"],
            env=settings.child_environment(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert once.returncode == 1, once.stdout + once.stderr
        assert "another aggregator leads: metering aggregate on" in once.stderr

        async def used(value: int) -> bool:
            raw = await db.fetchval(
                "SELECT check_feature_access(NULL, 'max_api_calls_per_month', $1)", org
            )
            return bool(json.loads(raw)["used"] == value)

        await events.add("api_call", datetime.now(UTC).isoformat(), 850)
        await async_wait_for(lambda: used(850), 30, "the leader to aggregate")
        assert not await says(second_log, "leading")
        first.kill()
        first.wait(timeout=10)
        await async_wait_for(lambda: says(second_log, "leading"), 30, "the take-over")
        await events.add("api_call", datetime.now(UTC).isoformat(), 100)
        await async_wait_for(lambda: used(950), 30, "the new leader to aggregate")
        await async_wait_for(
            lambda: messages_of(settings, org), 30, "the 80% crossing on the limits topic"
        )
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
    assert [(m["threshold_percent"], m["used"]) for m in await messages_of(settings, org)] == [
        (80, "850")
    ]


async def test_ctrl_c_stops_the_leader_cleanly_and_hands_the_lead_over(
    settings: Settings, tmp_path: Path
) -> None:
    """Ctrl-C reaches every process of `metering run`, and the supervisor's SIGTERM follows
    it: the second signal must not cut short the leader's shutdown (closing its lock
    session), which would print a traceback and leave the standby waiting for the server to
    notice a dead session."""
    logs = [tmp_path / f"aggregate-{n}.log" for n in range(3)]
    processes = [aggregate_process(settings, logs[0])]
    try:
        await async_wait_for(lambda: says(logs[0], "leading"), 30, "the first to lead")
        for n in (1, 2):
            standby_log = logs[n]
            processes.append(aggregate_process(settings, standby_log))
            await async_wait_for(
                functools.partial(says, standby_log, "standing by"), 30, "a standby"
            )
            leader = processes[n - 1]
            leader.send_signal(signal.SIGINT)
            await asyncio.sleep(0.003)  # inside the leader's shutdown
            leader.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(leader.wait, 30) == 0
            output = logs[n - 1].read_text()
            assert "stopping: signal received" in output
            assert "Traceback" not in output, output
            await async_wait_for(
                functools.partial(says, standby_log, "leading"), 10, "the standby to lead"
            )
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


async def test_crossings_once_when_kafka_restarts_under_the_publisher(
    settings: Settings,
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
    dev_services: DevServices,
) -> None:
    crossings = [
        await recorded_crossing(settings, db, event_store, aggregate_store) for _ in range(5)
    ]
    aggregator, publisher = await publishing_aggregator(settings, aggregate_store)
    await aggregator.run_once()  # the producer is started and publishing works
    more = [await recorded_crossing(settings, db, event_store, aggregate_store) for _ in range(5)]
    await asyncio.to_thread(dev_services.stop_kafka)
    publishing = asyncio.create_task(aggregator.publish_pending())
    await asyncio.sleep(2)
    assert not publishing.done(), "with the broker down it must keep retrying"
    await asyncio.to_thread(dev_services.start_kafka)
    await asyncio.wait_for(publishing, 90)
    await publisher.stop()

    for crossing in crossings + more:
        ids = [m["id"] for m in await messages_of(settings, crossing.org_id)]
        assert ids == [str(crossing.id)]
    unpublished = (
        "SELECT count(*) FROM limit_notifications WHERE id = ANY($1) AND published_at IS NULL"
    )
    assert await db.fetchval(unpublished, [c.id for c in crossings + more]) == 0


async def test_aggregation_goes_on_while_kafka_is_down_and_the_crossing_follows(
    settings: Settings,
    db: asyncpg.Connection,
    event_store: EventStore,
    aggregate_store: AggregateStore,
    dev_services: DevServices,
) -> None:
    """The limits topic is a notification channel: while it cannot be written, crossings
    wait in limit_notifications, and usage_aggregations (what the access check and billing
    read) must keep up with the stored events. Once the broker is back the crossings go out,
    each once."""
    org = uuid.uuid4()
    await subscribe(db, org, "free")
    events = Events(event_store, org)
    aggregator, publisher = await publishing_aggregator(settings, aggregate_store)
    await aggregator.run_once()  # the producer is started and publishing works
    running = asyncio.create_task(aggregator.run_forever())

    async def used() -> object:
        raw = await db.fetchval(
            "SELECT check_feature_access(NULL, 'max_api_calls_per_month', $1)", org
        )
        return json.loads(raw)["used"]

    try:
        await asyncio.to_thread(dev_services.stop_kafka)
        now = datetime.now(UTC).isoformat()
        await events.add("api_call", now, 850)  # 80% crossed: its message cannot be sent
        await async_wait_for(lambda: _equals(used(), 850), 10, "the first events aggregated")
        await events.add("api_call", now, 100)
        await async_wait_for(
            lambda: _equals(used(), 950), 10, "events aggregated while a crossing waits"
        )
        assert not running.done(), running
        await asyncio.to_thread(dev_services.start_kafka)
        await events.add("api_call", now, 60)  # 101%: the second crossing
        await async_wait_for(lambda: _count_published(db, org, 2), 90, "both crossings published")
    finally:
        running.cancel()
        # bounded: a publisher stuck on the missing broker once held the cancel forever
        await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 60)
        await asyncio.to_thread(dev_services.start_kafka)  # no-op when running
        await publisher.stop()
    thresholds = sorted(m["threshold_percent"] for m in await messages_of(settings, org))
    assert thresholds == [80, 100]


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def _count_published(db: asyncpg.Connection, org: uuid.UUID, expected: int) -> bool:
    published = await db.fetchval(
        "SELECT count(*) FROM limit_notifications WHERE org_id = $1 AND published_at IS NOT NULL",
        org,
    )
    return bool(published == expected)


async def test_sigterm_stops_the_aggregator_while_a_crossing_waits_for_kafka(
    settings: Settings,
    db: asyncpg.Connection,
    event_store: EventStore,
    dev_services: DevServices,
    tmp_path: Path,
) -> None:
    """A crossing that cannot reach the missing broker must not hold up a shutdown: the
    crossing stays in limit_notifications for the next start."""
    org = uuid.uuid4()
    await subscribe(db, org, "free")
    log = tmp_path / "aggregate.log"
    process = aggregate_process(settings, log)
    try:
        await async_wait_for(lambda: says(log, "leading"), 30, "the aggregator to lead")
        await asyncio.to_thread(dev_services.stop_kafka)
        await Events(event_store, org).add("api_call", datetime.now(UTC).isoformat(), 850)
        await async_wait_for(lambda: says(log, "limit crossing"), 30, "the crossing recorded")
        await asyncio.sleep(3)  # the publisher is now retrying against the missing broker
        process.send_signal(signal.SIGTERM)
        # bounded by the producer's request timeout (REQUEST_TIMEOUT_MS), not by the broker
        try:
            status = await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after SIGTERM:\n{log.read_text()[-3000:]}")
        assert status == 0, log.read_text()[-3000:]
        unpublished = await db.fetchval(
            "SELECT count(*) FROM limit_notifications WHERE org_id = $1 AND published_at IS NULL",
            org,
        )
        assert unpublished == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        await asyncio.to_thread(dev_services.start_kafka)
