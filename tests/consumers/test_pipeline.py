"""Kafka -> consumer -> Postgres on the real broker and database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaProducer

from metering.config import Settings
from metering.topics import EVENT_MAX_BYTES
from tests.conftest import ConsumerProcess, async_wait_for, read_topic
from tests.consumers.conftest import (
    assert_exact,
    publish_stream,
    scrape,
    stored_count,
    stored_keys,
)

pytestmark = pytest.mark.services


def invalid_messages(org: uuid.UUID) -> list[tuple[bytes, str]]:
    """One message per rule of contract section 1, with the code it must be rejected with."""
    now = datetime.now(UTC)

    def body(**fields: object) -> bytes:
        base: dict[str, object] = {
            "id": f"bad-{uuid.uuid4().hex[:6]}",
            "type": "api_call",
            "org_id": str(org),
            "occurred_at": now.isoformat(),
        }
        base.update(fields)
        return json.dumps(base).encode()

    return [
        (body(surprise=1), "unknown_field"),
        (body(org_id="not-a-uuid"), "invalid_uuid"),
        (body(quantity=-3), "negative_quantity"),
        (body().replace(b'"api_call"', b'"api_call","quantity":NaN'), "not_json"),
        (body().replace(b'"api_call"', b'"api_call","quantity":1e999'), "invalid_quantity"),
        (
            body().replace(b'"api_call"', b'"api_call","quantity":12345678901234567890'),
            "quantity_too_precise",
        ),
        (body(occurred_at="2026-01-01T00:00:00"), "timestamp_without_offset"),
        (body(occurred_at=(now + timedelta(hours=1)).isoformat()), "timestamp_in_future"),
        (body(occurred_at=(now - timedelta(days=40)).isoformat()), "timestamp_too_old"),
        (body(metadata={"pad": "x" * 17000}), "too_large"),
        (b"this is not json", "not_json"),
        (b"\xc3\x28 invalid utf-8", "not_utf8"),
        (body(type="user_active"), "user_required"),
        (body(type="api_calls"), "unknown_type"),  # contract v2: no meter reads it
        (body(type="Api-Call"), "invalid_type"),
        (body(id="no spaces allowed"), "invalid_id"),
        # valid JSON that PostgreSQL's jsonb cannot store: once, it failed its whole batch
        (body(metadata={"note": "a\x00b"}), "invalid_metadata"),
    ]


async def test_duplicates_and_every_invalid_kind(
    settings: Settings,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    stream = await publish_stream(producer, settings, events=3000, orgs=40, duplicate_rate=0.1)
    bad = invalid_messages(stream.orgs[0])
    for value, _ in bad:
        await producer.send_and_wait(settings.events_topic, value, key=str(stream.orgs[0]).encode())
    # a late copy of an already published id, after the others
    org, event_id = next(iter(stream.expected_keys))
    late_copy = {
        "id": event_id,
        "type": "api_call",
        "org_id": str(org),
        "quantity": 99,
        "occurred_at": datetime.now(UTC).isoformat(),
    }
    await producer.send_and_wait(
        settings.events_topic, json.dumps(late_copy).encode(), key=str(org).encode()
    )

    consumer = start_consumer()

    async def all_stored() -> bool:
        return await stored_count(migrated_database, stream.orgs) >= len(stream.expected_keys)

    await async_wait_for(all_stored, 60, "all valid events stored")
    letters = await read_topic(settings, settings.dlq_topic, expected=len(bad))
    assert_exact(await stored_keys(migrated_database, stream.orgs), stream)

    assert len(letters) == len(bad)
    by_value = {letter.value: letter for letter in letters}
    for value, code in bad:
        letter = by_value[value]  # original bytes, unchanged
        headers = {k: v.decode() for k, v in letter.headers}
        assert headers["error.code"] == code, (value[:80], headers)
        assert headers["error.reason"]
        assert headers["source.topic"] == settings.events_topic
        assert int(headers["source.offset"]) >= 0
        assert 0 <= int(headers["source.partition"]) < 6
        assert letter.key == str(stream.orgs[0]).encode()
    assert consumer.process.poll() is None, consumer.log_text()

    metrics = scrape(consumer.metrics_port)
    duplicates = stream.messages + 1 - len(stream.expected_keys)
    assert metrics["metering_events_duplicate_total"] == duplicates
    assert metrics["metering_events_stored_total"] == len(stream.expected_keys)
    assert metrics['metering_events_dead_lettered_total{reason="not_json"}'] == 2
    assert metrics['metering_events_dead_lettered_total{reason="too_large"}'] == 1
    assert metrics["metering_consumer_messages_total"] == stream.messages + 1 + len(bad)


async def test_non_utf8_header_does_not_block_the_partition(
    settings: Settings,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    """A header value that is not UTF-8 once made FastStream's parser fail the whole batch
    forever; the events around it (and the message itself) must be stored."""
    org = uuid.uuid4()

    def body(n: int) -> bytes:
        return json.dumps(
            {
                "id": f"h{n}",
                "type": "api_call",
                "org_id": str(org),
                "occurred_at": datetime.now(UTC).isoformat(),
            }
        ).encode()

    await producer.send_and_wait(settings.events_topic, body(1), key=str(org).encode())
    await producer.send_and_wait(
        settings.events_topic, body(2), key=str(org).encode(), headers=[("trace", b"\xff\xfe")]
    )
    await producer.send_and_wait(settings.events_topic, body(3), key=str(org).encode())
    consumer = start_consumer()

    async def all_three() -> bool:
        return await stored_count(migrated_database, [org]) == 3

    await async_wait_for(all_three, 30, "the three events around a non-UTF-8 header")
    assert "UnicodeDecodeError" not in consumer.log_text()


async def test_a_message_as_large_as_the_topic_allows_is_dead_lettered_unchanged(
    settings: Settings,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    """The DLQ holds the original bytes plus reason headers: a message the events topic
    accepted must fit there too, or its dead letter would be retried forever and block the
    partition with every good event behind it."""
    org = uuid.uuid4()
    huge = b'{"pad":"' + b"x" * (EVENT_MAX_BYTES - 150) + b'"}'
    after = json.dumps(
        {
            "id": "after-the-huge-one",
            "type": "api_call",
            "org_id": str(org),
            "occurred_at": datetime.now(UTC).isoformat(),
        }
    ).encode()
    kafka = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        max_request_size=2 * EVENT_MAX_BYTES,
    )
    await kafka.start()
    try:
        for value in (huge, after):  # same key: same partition, in this order
            await kafka.send_and_wait(settings.events_topic, value, key=str(org).encode())
    finally:
        await kafka.stop()

    consumer = start_consumer()

    async def stored() -> bool:
        return await stored_count(migrated_database, [org]) == 1

    await async_wait_for(stored, 60, "the event after the huge message stored")
    letters = await read_topic(settings, settings.dlq_topic, expected=1)
    assert [letter.value for letter in letters] == [huge]
    assert dict(letters[0].headers)["error.code"] == b"too_large"
    assert consumer.process.poll() is None, consumer.log_text()
