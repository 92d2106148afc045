"""Reading and replaying the dead-letter topic (contract sections 3 and 10).

A dead letter is the original message, unchanged, with headers saying why it was refused
(`error.code`, `error.reason`) and where it was read (`source.topic`, `source.partition`,
`source.offset`). A replay republishes the original bytes and key to the events topic; the
consumer validates them again, and the dedupe key makes a replay safe to run twice. What
became of each replayed message is then read back, not guessed: the consumer group's
committed offsets say it was processed, the dead-letter topic whether it was refused again
(matched by its new source offset), `usage_event_ids` whether it was stored now or before.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from metering.config import Settings
from metering.partitioner import OrgKeyPartitioner
from metering.topics import EVENT_MAX_BYTES

REPLAY_HEADER = "replay.of"


@dataclass(frozen=True)
class DeadLetterRecord:
    partition: int
    offset: int
    timestamp: datetime
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def position(self) -> str:
        """`partition:offset` in the dead-letter topic (what `dlq show` takes)."""
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return None

    @property
    def code(self) -> str:
        return self.header("error.code") or "unknown"

    @property
    def reason(self) -> str:
        return self.header("error.reason") or ""

    def source(self) -> tuple[str, int, int] | None:
        """(topic, partition, offset) the message was read from, when the headers say."""
        topic, partition, offset = (
            self.header("source.topic"),
            self.header("source.partition"),
            self.header("source.offset"),
        )
        if topic is None or partition is None or offset is None:
            return None
        try:
            return topic, int(partition), int(offset)
        except ValueError:
            return None

    def event_key(self) -> tuple[uuid.UUID, str] | None:
        """(org_id, id) of the event in the message, when it is readable JSON."""
        try:
            document = json.loads(self.value or b"")
            return uuid.UUID(str(document["org_id"])), str(document["id"])
        except (ValueError, TypeError, KeyError):
            return None

    def org_id(self) -> str | None:
        """The organization, if readable: from the event, else the message key."""
        found = self.event_key()
        if found is not None:
            return str(found[0])
        try:
            return str(uuid.UUID((self.key or b"").decode()))
        except (ValueError, UnicodeDecodeError):
            return None


def _reader(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )


async def dead_letter_ends(settings: Settings) -> dict[int, int]:
    """The end offset of each partition of the dead-letter topic, now."""
    consumer = _reader(settings)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, settings.dlq_topic)
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    numbers = await consumer._client.fetch_all_metadata()  # the consumer has no public call
    found = numbers.partitions_for_topic(topic)
    if not found:
        raise LookupError(f"the topic {topic} does not exist")
    return [TopicPartition(topic, n) for n in sorted(found)]


async def dead_letters(
    settings: Settings,
    *,
    since: datetime | None = None,
    code: str | None = None,
    starts: dict[int, int] | None = None,
    ends: dict[int, int] | None = None,
) -> AsyncIterator[DeadLetterRecord]:
    """The dead letters from `starts` (default: the start, or the first at or after
    `since`) to `ends` (default: the end as of now), partition after partition, of error
    code `code` when given."""
    consumer = _reader(settings)
    await consumer.start()
    try:
        partitions = await _partitions(consumer, settings.dlq_topic)
        consumer.assign(partitions)
        until = (
            ends
            if ends is not None
            else {
                tp.partition: offset
                for tp, offset in (await consumer.end_offsets(partitions)).items()
            }
        )
        if starts is not None:
            for tp in partitions:
                consumer.seek(tp, starts.get(tp.partition, 0))
        elif since is not None:
            found = await consumer.offsets_for_times(
                {tp: int(since.timestamp() * 1000) for tp in partitions}
            )
            for tp in partitions:
                at = found.get(tp)
                consumer.seek(tp, at.offset if at is not None else until.get(tp.partition, 0))
        else:
            await consumer.seek_to_beginning(*partitions)
        for tp in partitions:
            end = until.get(tp.partition, 0)
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=1000)
                for message in batch.get(tp, []):
                    if message.offset >= end:
                        break
                    record = DeadLetterRecord(
                        tp.partition,
                        message.offset,
                        datetime.fromtimestamp(message.timestamp / 1000, UTC),
                        message.key,
                        message.value,
                        tuple((k, bytes(v)) for k, v in message.headers),
                    )
                    if code is None or record.code == code:
                        yield record
    finally:
        await consumer.stop()


async def find_dead_letter(settings: Settings, partition: int, offset: int) -> DeadLetterRecord:
    """The dead letter at `partition:offset` (only that partition is read, from there);
    LookupError when there is none."""
    ends = await dead_letter_ends(settings)
    if partition not in ends or not 0 <= offset < ends[partition]:
        raise LookupError(f"no dead letter at {partition}:{offset} in {settings.dlq_topic}")
    starts = {**ends, partition: offset}  # the other partitions: nothing to read
    async for record in dead_letters(settings, starts=starts, ends={**ends, partition: offset + 1}):
        return record
    raise LookupError(f"no dead letter at {partition}:{offset} in {settings.dlq_topic}")


@dataclass
class ReplayReport:
    """What a replay did: published, and of those processed by the consumer, how many were
    stored now, were stored already (duplicates), or were dead-lettered again (by code)."""

    published: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    processed: int = 0
    stored: int = 0
    failed_again: Counter[str] = field(default_factory=Counter)

    @property
    def pending(self) -> int:
        """Published but not processed by the consumer group when the wait ended."""
        return self.published - self.processed

    @property
    def already_stored(self) -> int:
        return self.processed - self.stored - sum(self.failed_again.values())

    def document(self) -> dict[str, object]:
        return {
            "published": self.published,
            "by_code": dict(self.by_code),
            "processed": self.processed,
            "stored": self.stored,
            "already_stored": self.already_stored,
            "failed_again": dict(self.failed_again),
            "pending": self.pending,
        }


@dataclass(frozen=True)
class Published:
    partition: int
    offset: int
    event: tuple[uuid.UUID, str] | None


async def republish(
    settings: Settings,
    letters: AsyncIterator[DeadLetterRecord],
    on_sent: Callable[[DeadLetterRecord], None] | None = None,
) -> list[Published]:
    """Publish each letter's original bytes and key to the events topic (acks=all,
    idempotent producer), with a `replay.of` header naming the dead letter; returns where
    each one landed."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=10,
        max_request_size=EVENT_MAX_BYTES + 4096,
        partitioner=OrgKeyPartitioner(),
    )
    await producer.start()
    pending: list[tuple[asyncio.Future[object], tuple[uuid.UUID, str] | None]] = []
    try:
        async for letter in letters:
            origin = f"{settings.dlq_topic}:{letter.position}".encode()
            future = await producer.send(
                settings.events_topic,
                value=letter.value,
                key=letter.key,
                headers=[(REPLAY_HEADER, origin)],
            )
            pending.append((future, letter.event_key()))
            if on_sent is not None:
                on_sent(letter)
        await producer.flush()
        placed = await asyncio.gather(*(f for f, _ in pending))
    finally:
        await producer.stop()
    return [
        Published(meta.partition, meta.offset, event)  # type: ignore[attr-defined]
        for meta, (_, event) in zip(placed, pending, strict=True)
    ]


async def wait_until_processed(
    settings: Settings, published: list[Published], wait_seconds: float
) -> set[tuple[int, int]]:
    """Wait (at most `wait_seconds`) until the consumer group has committed past every
    published offset; returns the (partition, offset) pairs it has processed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            committed = await admin.list_consumer_group_offsets(settings.consumer_group)
            done = {
                tp.partition: meta.offset
                for tp, meta in committed.items()
                if tp.topic == settings.events_topic and meta is not None
            }
            processed = {
                (p.partition, p.offset) for p in published if p.offset < done.get(p.partition, -1)
            }
            if len(processed) == len(published) or time.monotonic() > deadline:
                return processed
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def failed_again(
    settings: Settings, starts: dict[int, int], processed: set[tuple[int, int]]
) -> Counter[str]:
    """Error codes of the dead letters written since `starts` for the replayed messages."""
    codes: Counter[str] = Counter()
    async for record in dead_letters(settings, starts=starts):
        source = record.source()
        if source is not None and source[0] == settings.events_topic and source[1:] in processed:
            codes[record.code] += 1
    return codes
