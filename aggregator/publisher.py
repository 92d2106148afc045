"""Threshold crossings to the limits topic, exactly once.

A crossing is recorded in `limit_notifications` (the outbox) by the pass that found it and
published after that pass commits. Acknowledged sends alone would make that at-least-once: an
aggregator that dies after Kafka acknowledged a message and before the row was marked
published sends it again on restart, and two aggregators at once would both send the same
rows. So:

- every aggregator of one limits topic uses the same transactional id: starting a publisher
  fences all older ones (Kafka aborts their open transaction; their next send fails with
  ProducerFenced, which we raise as AggregatorNotActive);
- each batch goes out in one Kafka transaction and is marked published after it committed;
- after fencing, and before sending anything, the publisher reads the topic (read_committed)
  from shortly before the oldest unpublished crossing, and the caller marks every crossing
  found there as published: what a predecessor committed but could not mark is not sent again.

Readers of the limits topic must use isolation.level=read_committed; with the default
(read_uncommitted) they would also see the messages of aborted transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import datetime, timedelta
from uuid import UUID

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ProducerFenced, UnknownTopicOrPartitionError

from aggregator.limits import Crossing
from metering.config import Settings
from metering.errors import AggregatorNotActive
from metering.topics import committed_reader

log = logging.getLogger("metering.aggregator")

# A crossing's time comes from the clock of the aggregator that found it, the message's
# timestamp from the one that published it; after a fail-over those are two hosts. Reading
# back from an hour before the oldest unpublished crossing covers any sane clock skew.
READ_BACK_MARGIN = timedelta(hours=1)
READ_BACK_TIMEOUT_SECONDS = 60.0
# A batch not committed within this raises TimeoutError (the caller stops the producer and
# retries with a new one). Without it a send to a broker that is gone waits forever, and
# leaving aiokafka's transaction() context on an error waits forever for the abort.
PUBLISH_TIMEOUT_SECONDS = 15.0
REQUEST_TIMEOUT_MS = 10_000
# aiokafka's stop() first waits for every record sent and not yet delivered; in a
# transaction whose partitions could not be added (the broker is gone) that is forever.
STOP_TIMEOUT_SECONDS = 5.0


def transactional_id(settings: Settings) -> str:
    """The same for every aggregator publishing to this limits topic, so each fences the
    one before it."""
    return f"metering-aggregator.{settings.limits_topic}"


class CrossingPublisher:
    """Owns the transactional producer; `start` fences older publishers."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        """Start a producer with the shared transactional id. Kafka errors propagate (the
        caller retries them); once this returns, no older aggregator can publish."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            transactional_id=transactional_id(self._settings),
            request_timeout_ms=REQUEST_TIMEOUT_MS,
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # fenced: a newer publisher took over, and its start aborted our transaction
            with contextlib.suppress(ProducerFenced):
                await stop_producer(producer, STOP_TIMEOUT_SECONDS)

    async def publish(self, batch: list[Crossing]) -> None:
        """Send `batch` in one transaction; return once it committed. Raise
        AggregatorNotActive if a newer aggregator fenced this one (nothing of the batch is
        visible to read_committed readers then); other Kafka errors, and TimeoutError after
        PUBLISH_TIMEOUT_SECONDS, propagate, and the caller must `stop` and `start` again
        before retrying (the outcome of the commit may be unknown: `published_since` after
        the new start tells)."""
        assert self._producer is not None, "start() first"
        producer = self._producer
        try:
            # Not producer.transaction(): on an error it waits for the abort, forever while
            # the broker is gone. An open transaction is aborted by the broker when the
            # next producer with our transactional id starts (or when it times out).
            await producer.begin_transaction()
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                sent = [
                    await producer.send(
                        self._settings.limits_topic,
                        value=json.dumps(crossing.message()).encode(),
                        key=str(crossing.org_id).encode(),
                    )
                    for crossing in batch
                ]
                await asyncio.gather(*sent)
                await producer.commit_transaction()
        except ProducerFenced:
            raise AggregatorNotActive(
                "fenced: a newer aggregator's producer publishes to the limits topic now"
            ) from None

    async def published_since(self, since: datetime) -> set[UUID]:
        """The ids of every committed message on the limits topic with a timestamp from
        `since - READ_BACK_MARGIN` on. Kafka errors and a read that does not reach the end
        within READ_BACK_TIMEOUT_SECONDS propagate (TimeoutError); retry them."""
        consumer = committed_reader(self._settings, self._settings.limits_topic)
        await consumer.start()
        try:
            return await _read_ids(consumer, self._settings.limits_topic, since - READ_BACK_MARGIN)
        finally:
            await consumer.stop()


async def stop_producer(producer: AIOKafkaProducer, seconds: float) -> None:
    """Stop `producer`; after `seconds`, abandon what it has not delivered. Abandoned
    records were never committed: their crossings stay unpublished in limit_notifications,
    and the next producer's start aborts the open transaction."""
    try:
        async with asyncio.timeout(seconds):
            await producer.stop()
    except TimeoutError:
        log.warning(
            "the Kafka producer did not stop within %.0f s (broker unreachable?): its "
            "unsent crossings stay in limit_notifications for the next one",
            seconds,
        )
        # aiokafka 0.14 has no way to give up on undelivered records, and its sender, even
        # cancelled, waits for the transaction request in flight, which retries until the
        # broker is back. Closing the connections leaves it idle (no CPU, measured) until a
        # new producer with our transactional id fences it or the event loop ends.
        await producer.client.close()


async def _read_ids(consumer: AIOKafkaConsumer, topic: str, since: datetime) -> set[UUID]:
    numbers = consumer.partitions_for_topic(topic)
    if not numbers:
        raise UnknownTopicOrPartitionError(f"no partitions known for {topic}")
    partitions = [TopicPartition(topic, number) for number in sorted(numbers)]
    consumer.unsubscribe()
    consumer.assign(partitions)
    starts = await consumer.offsets_for_times(
        {tp: int(since.timestamp() * 1000) for tp in partitions}
    )
    ends = await consumer.end_offsets(partitions)
    remaining: dict[TopicPartition, int] = {}
    for tp in partitions:
        start = starts.get(tp)
        if start is not None and start.offset < ends[tp]:
            consumer.seek(tp, start.offset)
            remaining[tp] = ends[tp]
    ids: set[UUID] = set()
    deadline = time.monotonic() + READ_BACK_TIMEOUT_SECONDS
    while remaining:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading back {topic} did not reach its end")
        batch = await consumer.getmany(*remaining, timeout_ms=500)
        for records in batch.values():
            for record in records:
                try:
                    ids.add(UUID(json.loads(record.value)["id"]))
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a message on %s without a crossing id", topic)
        for tp in list(remaining):
            if await consumer.position(tp) >= remaining[tp]:
                del remaining[tp]
    return ids
