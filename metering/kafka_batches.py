"""Publishing the events of many concurrent requests through one producer.

aiokafka holds one pending record batch per partition. `send_batch` from many requests at
once makes them all wait for that one slot, and its wait loop subtracts the time elapsed
since it started on every wake-up (aiokafka 0.14 `MessageAccumulator.add_batch`), so with
enough waiters a healthy broker looked like a timeout: 5-27% of 200 concurrent one-event
requests were answered 503. Here each partition has one sender task and a queue: requests
append their records and wait for their acknowledgements; the sender takes whatever is queued
into one record batch, hands it to the producer (the only waiter for that partition's slot)
and goes on with what arrived meanwhile. Concurrent requests share batches, so more
concurrency means fewer, fuller batches rather than a longer line.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from metering.config import Settings
from metering.partitioner import OrgKeyPartitioner


def events_producer(
    settings: Settings, partitioner: OrgKeyPartitioner, *, linger_ms: int = 2
) -> AIOKafkaProducer:
    """A producer for the events topic, as the API and `metering import` publish: acks=all,
    idempotent, record batches up to 512 KiB, partitioned by organization (`partitioner`,
    which EventPublisher must be given too). Not started."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=512 * 1024,
        partitioner=partitioner,
    )


@dataclass(frozen=True)
class _Queued:
    key: bytes
    value: bytes
    timestamp_ms: int | None
    acked: asyncio.Future[None]


class EventPublisher:
    """Publishes (key, value) messages to one topic, partitioned by `partitioner`, for any
    number of concurrent callers. Owned by the API's lifespan, next to its producer."""

    def __init__(
        self, producer: AIOKafkaProducer, partitioner: OrgKeyPartitioner, topic: str
    ) -> None:
        self._producer = producer
        self._partitioner = partitioner
        self._topic = topic
        self._queues: dict[int, deque[_Queued]] = defaultdict(deque)
        self._senders: dict[int, asyncio.Task[None]] = {}

    async def publish(
        self, messages: Sequence[tuple[bytes, bytes]], *, timestamp_ms: int | None = None
    ) -> None:
        """Publish every (key, value) and return once the broker has acknowledged all of
        them (with the producer's acks, `all` for ours), each record stamped `timestamp_ms`
        (None: the producer's clock). Raises the producer's error otherwise; then some of
        the messages may be on Kafka already (callers publish events that carry their id, so
        a retry is safe). Cancelled (e.g. by the caller's timeout), the messages not yet
        handed to the producer are withdrawn.
        """
        partitions = sorted(await self._producer.partitions_for(self._topic))
        loop = asyncio.get_running_loop()
        acks: list[asyncio.Future[None]] = []
        for key, value in messages:
            partition = self._partitioner(key, partitions, partitions)
            acked: asyncio.Future[None] = loop.create_future()
            self._queues[partition].append(_Queued(key, value, timestamp_ms, acked))
            acks.append(acked)
            if partition not in self._senders:
                self._senders[partition] = asyncio.create_task(self._send(partition))
        await asyncio.gather(*acks)

    async def close(self) -> None:
        """Stop the senders (before the producer stops); whatever is still queued fails with
        a KafkaError, which the API answers with 503."""
        senders = list(self._senders.values())
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)

    async def _send(self, partition: int) -> None:
        queue = self._queues[partition]
        try:
            while queue:
                batch = self._producer.create_batch()
                taken: list[asyncio.Future[None]] = []
                while queue:
                    item = queue[0]
                    if item.acked.done():  # its request gave up: leave it out
                        queue.popleft()
                        continue
                    # an empty batch takes any record; a full one returns None
                    appended = batch.append(
                        key=item.key, value=item.value, timestamp=item.timestamp_ms
                    )
                    if appended is None:
                        break
                    queue.popleft()
                    taken.append(item.acked)
                if not taken:
                    continue
                try:
                    delivered = await self._producer.send_batch(
                        batch, self._topic, partition=partition
                    )
                except asyncio.CancelledError:
                    _settle(taken, KafkaError("the publisher is closing"))
                    raise
                except Exception as error:  # the producer's: KafkaError, timeout, closed
                    _settle(taken, error)
                    continue
                delivered.add_done_callback(partial(_settle_when_delivered, taken))
        except asyncio.CancelledError:
            _settle([item.acked for item in queue], KafkaError("the publisher is closing"))
            queue.clear()
            raise
        finally:
            del self._senders[partition]


def _settle_when_delivered(
    acks: list[asyncio.Future[None]], delivered: asyncio.Future[object]
) -> None:
    if delivered.cancelled():
        _settle(acks, KafkaError("the producer cancelled the batch"))
    else:
        _settle(acks, delivered.exception())


def _settle(acks: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """Resolve each acknowledgement still awaited: success, or `error`."""
    for acked in acks:
        if acked.done():
            continue
        if error is None:
            acked.set_result(None)
        else:
            acked.set_exception(error)
