"""No input stops the consumer (issue 42), on the real broker and database: numbers that
are expensive or impossible to convert, nesting, compressed batches from another client,
and the lateness edge judged at acceptance rather than at consumption."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer as LibrdkafkaProducer

from metering.config import Settings
from metering.models import timestamp_ms
from tests.conftest import ConsumerProcess, async_wait_for, read_topic
from tests.conftest import usage_event_text as event
from tests.conftest import with_field as add_field
from tests.consumers.conftest import scrape, stored_count

pytestmark = pytest.mark.services


def with_field(raw: str, fragment: str) -> bytes:
    return add_field(raw, fragment).encode()


async def test_numbers_and_nesting_that_once_stopped_the_pipeline_are_dead_lettered(
    settings: Settings,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    """Each of these passed validation or broke it: `1e5000` in metadata failed its batch
    forever (json.dumps of a 5,000-digit int), `1e-999999999` as a quantity took seconds
    and a gigabyte. Interleaved with good events on several partitions, each must be
    dead-lettered with its code while every good event is stored."""
    orgs = [uuid.uuid4() for _ in range(6)]
    deep = "[" * 40 + "1" + "]" * 40
    poison = [
        ('"metadata":{"x":1e5000}', "invalid_metadata"),
        ('"metadata":{"x":1e600000}', "invalid_metadata"),
        ('"metadata":{"x":1e9999999999999999999}', "invalid_metadata"),
        ('"metadata":{"x":' + "9" * 100 + "}", "invalid_metadata"),
        # more digits than Python's own integer parser takes: refused while decoding
        ('"metadata":{"x":' + "9" * 5000 + "}", "not_json"),
        ('"metadata":{"x":NaN}', "not_json"),
        ('"metadata":{"x":-Infinity}', "not_json"),
        ('"metadata":{"deep":' + deep + "}", "invalid_metadata"),
        ('"quantity":1e-999999999', "invalid_quantity"),
        ('"quantity":1e131072', "invalid_quantity"),
        ('"quantity":1234567890123456789012345678901', "quantity_too_precise"),
        ('"quantity":0.1234567890123456789012345678901', "quantity_too_precise"),
    ]
    bad: dict[bytes, str] = {}
    good = 0
    for n, (fragment, code) in enumerate(poison):
        for org in orgs:  # every partition that has one of these orgs gets the poison
            value = with_field(event(org, f"poison-{n}"), fragment)
            bad[value] = code
            await producer.send(settings.events_topic, value, key=str(org).encode())
            await producer.send(
                settings.events_topic,
                event(org, f"good-{n}").encode(),
                key=str(org).encode(),
            )
            good += 1
    # metadata numbers that are in range are stored exactly, digit for digit
    exact = uuid.uuid4()
    await producer.send(
        settings.events_topic,
        with_field(event(exact, "exact"), '"metadata":{"x":12345678901234567890.5,"y":1E+5}'),
        key=str(exact).encode(),
    )
    await producer.flush()
    consumer = start_consumer()

    async def all_good_stored() -> bool:
        return await stored_count(migrated_database, [*orgs, exact]) == good + 1

    await async_wait_for(all_good_stored, 60, "every good event around the poison")
    letters = await read_topic(settings, settings.dlq_topic, expected=len(bad))
    codes = {letter.value: dict(letter.headers)["error.code"].decode() for letter in letters}
    assert codes == bad
    assert consumer.process.poll() is None, consumer.log_text()
    metrics = scrape(consumer.metrics_port)
    assert metrics['metering_events_dead_lettered_total{reason="invalid_metadata"}'] == 5 * 6
    conn = await asyncpg.connect(migrated_database)
    try:
        stored = await conn.fetchval(
            "SELECT metadata::text FROM usage_events WHERE org_id = $1", exact
        )
    finally:
        await conn.close()
    assert stored == '{"x": 12345678901234567890.5, "y": 100000}'
    # dead letters are logged as counts per interval, not one line each
    assert consumer.log_text().count("dead-lettered") < len(bad) / 2, consumer.log_text()


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy", "gzip"])
async def test_batches_compressed_by_another_client_are_read(
    codec: str,
    settings: Settings,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    """librdkafka (the C client under most non-Java producers) compresses by choice; one
    lz4/zstd/snappy batch used to stop the consumer (UnsupportedCodecError: aiokafka was
    installed without its codec extras) with nothing stored or dead-lettered after it."""
    org = uuid.uuid4()
    kafka = LibrdkafkaProducer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "compression.codec": codec,
            "linger.ms": 50,
            "enable.idempotence": True,
        }
    )
    for n in range(200):
        kafka.produce(settings.events_topic, event(org, f"{codec}-{n}").encode(), str(org))
    kafka.produce(settings.events_topic, b"not json, compressed too", str(org))
    assert kafka.flush(30) == 0
    consumer = start_consumer()

    async def all_stored() -> bool:
        return await stored_count(migrated_database, [org]) == 200

    await async_wait_for(all_stored, 60, f"200 events from {codec}-compressed batches")
    letters = await read_topic(settings, settings.dlq_topic, expected=1)
    assert [letter.value for letter in letters] == [b"not json, compressed too"]
    assert "UnsupportedCodecError" not in consumer.log_text()


async def test_lateness_is_judged_when_the_event_was_accepted_not_when_it_is_read(
    settings: Settings,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    """An event accepted 15 s inside the lateness window and read after a minute of lag was
    dead-lettered `timestamp_too_old` after the API had answered 202. The record's
    timestamp (when it was accepted) is what it is judged against, within a bound: a
    timestamp far in the past cannot reopen a closed window, nor one ahead of the
    consumer's clock widen the future tolerance."""
    org = uuid.uuid4()
    now = datetime.now(UTC)
    accepted = now - timedelta(seconds=60)  # accepted a minute ago, read only now
    window = settings.lateness_window
    cases = [
        # (occurred_at, record timestamp, stored?)
        (accepted - window + timedelta(seconds=15), accepted, True),
        (accepted - window - timedelta(seconds=15), accepted, False),
        # a timestamp from two days ago counts as at most a day ago
        (now - window - timedelta(days=1, minutes=1), now - timedelta(days=2), False),
        (now - window - timedelta(hours=23), now - timedelta(days=2), True),
        # a timestamp half an hour ahead counts as now (the broker refuses an hour ahead)
        (now + timedelta(minutes=20), now + timedelta(minutes=30), False),
        # no usable timestamp: judged at the consumer's clock
        (now - timedelta(seconds=5), None, True),
    ]
    for n, (occurred, record_time, _) in enumerate(cases):
        await producer.send(
            settings.events_topic,
            event(org, f"edge-{n}", occurred).encode(),
            key=str(org).encode(),
            timestamp_ms=None if record_time is None else timestamp_ms(record_time),
        )
    await producer.flush()
    start_consumer()
    expected_stored = sorted(f"edge-{n}" for n, case in enumerate(cases) if case[2])
    expected_letters = len(cases) - len(expected_stored)

    async def done() -> bool:
        return await stored_count(migrated_database, [org]) == len(expected_stored)

    await async_wait_for(done, 60, "the events inside the window at acceptance")
    letters = await read_topic(settings, settings.dlq_topic, expected=expected_letters)
    codes = sorted(dict(letter.headers)["error.code"].decode() for letter in letters)
    assert codes == ["timestamp_in_future", "timestamp_too_old", "timestamp_too_old"]
    conn = await asyncpg.connect(migrated_database)
    try:
        ids = [
            r["event_id"]
            for r in await conn.fetch(
                "SELECT event_id FROM usage_events WHERE org_id = $1 ORDER BY event_id", org
            )
        ]
    finally:
        await conn.close()
    assert ids == expected_stored
