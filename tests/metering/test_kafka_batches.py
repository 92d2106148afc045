"""Publishing record batches on the real broker: every message once, in its key's partition,
in order, with the timestamp given; concurrency never turns into a false timeout."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from metering.config import Settings
from metering.kafka_batches import EventPublisher
from metering.partitioner import OrgKeyPartitioner
from tests.conftest import read_topic

pytestmark = pytest.mark.services


async def test_every_message_once_in_its_keys_partition(settings: Settings) -> None:
    partitioner = OrgKeyPartitioner()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        max_batch_size=16 * 1024,
        partitioner=partitioner,
    )
    await producer.start()
    orgs = [str(uuid.uuid4()).encode() for _ in range(40)]
    # 3000 messages of ~220 bytes: several 16 KiB batches per partition
    messages = [(orgs[n % 40], b'{"n":%d,"pad":"%s"}' % (n, b"x" * 200)) for n in range(3000)]
    publisher = EventPublisher(producer, partitioner, settings.events_topic)
    try:
        await publisher.publish(messages[:2000], timestamp_ms=1_700_000_000_123)
        await publisher.publish(messages[2000:], timestamp_ms=1_700_000_000_456)
    finally:
        await publisher.close()
        await producer.stop()

    records = await read_topic(settings, settings.events_topic, 3000)
    assert len(records) == 3000
    assert sorted((r.key, r.value) for r in records) == sorted(messages)
    partitions = list(range(6))
    for record in records:
        assert record.partition == DefaultPartitioner()(record.key, partitions, partitions)
        number = int(record.value.split(b",")[0].split(b":")[1])
        assert record.timestamp == (1_700_000_000_123 if number < 2000 else 1_700_000_000_456)
    by_partition: dict[int, list[bytes]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_partition.setdefault(record.partition, []).append(record.value)
    for values in by_partition.values():  # in the order given, also across calls
        numbers = [int(v.split(b",")[0].split(b":")[1]) for v in values]
        assert numbers == sorted(numbers)


async def test_concurrent_requests_share_batches_instead_of_timing_out(settings: Settings) -> None:
    """The API's shape under load: 200 one-message publishes and 10 of 1,000 messages at once
    on one producer (as the API's). With aiokafka's send_batch per request, 5-70% of these
    failed with KafkaTimeoutError on a healthy broker; every one must be acknowledged, once."""
    partitioner = OrgKeyPartitioner()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        max_batch_size=512 * 1024,
        partitioner=partitioner,
        request_timeout_ms=5_000,  # a shorter slot wait than the default makes a miss likelier
    )
    await producer.start()
    publisher = EventPublisher(producer, partitioner, settings.events_topic)
    run = uuid.uuid4().hex[:8].encode()
    orgs = [str(uuid.uuid4()).encode() for _ in range(12)]
    singles = [[(orgs[n % 12], b"%s-single-%d" % (run, n))] for n in range(200)]
    bulks = [
        [
            (orgs[(b + n) % 12], b"%s-bulk-%d-%d-%s" % (run, b, n, b"x" * 10_000))
            for n in range(1000)
        ]
        for b in range(10)
    ]
    try:
        outcomes = await asyncio.gather(
            *(publisher.publish(messages) for messages in [*bulks, *singles]),
            return_exceptions=True,
        )
    finally:
        await publisher.close()
        await producer.stop()
    assert [o for o in outcomes if o is not None] == []
    sent = sorted(m for messages in [*bulks, *singles] for m in messages)
    records = await read_topic(settings, settings.events_topic, len(sent), timeout=120)
    ours = sorted((r.key, r.value) for r in records if r.value.startswith(run))
    assert ours == sent
