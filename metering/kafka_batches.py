"""Publishing many messages at once, one record batch per partition."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from metering.partitioner import OrgKeyPartitioner


async def publish_batches(
    producer: AIOKafkaProducer,
    partitioner: OrgKeyPartitioner,
    topic: str,
    messages: Sequence[tuple[bytes, bytes]],
) -> None:
    """Publish every (key, value) and return once the broker has acknowledged all of them
    (with the producer's acks, `all` for ours); raises the producer's error otherwise, and
    then some messages may be on Kafka already (callers publish events that carry their id).

    Same partitions as `producer.send` with `partitioner`; but the records of a partition go
    into record batches built here, so aiokafka's per-message work (a future, a partition
    lookup, an append to its queue) is done per batch: measured as 21% of the API's CPU
    while ingesting 500-event requests one `send` at a time.
    """
    partitions = sorted(await producer.partitions_for(topic))
    by_partition: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    for key, value in messages:
        by_partition[partitioner(key, partitions, partitions)].append((key, value))
    acks: list[asyncio.Future[object]] = []
    for partition, records in by_partition.items():
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                acks.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)  # an empty batch takes any
        if batch.record_count():
            acks.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*acks)
