"""Publishing record batches on the real broker: every message once, in its key's partition."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from metering.config import Settings
from metering.kafka_batches import publish_batches
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
    try:
        await publish_batches(producer, partitioner, settings.events_topic, messages[:2000])
        await publish_batches(producer, partitioner, settings.events_topic, messages[2000:])
    finally:
        await producer.stop()

    records = await read_topic(settings, settings.events_topic, 3000)
    assert len(records) == 3000
    assert sorted((r.key, r.value) for r in records) == sorted(messages)
    partitions = list(range(6))
    for record in records:
        assert record.partition == DefaultPartitioner()(record.key, partitions, partitions)
    by_partition: dict[int, list[bytes]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_partition.setdefault(record.partition, []).append(record.value)
    for values in by_partition.values():  # in the order given, also across calls
        numbers = [int(v.split(b",")[0].split(b":")[1]) for v in values]
        assert numbers == sorted(numbers)
