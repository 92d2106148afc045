"""Creating the service's Kafka topics with their partition counts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from metering.config import Settings

# The largest message the events topic takes (its max.message.bytes, Kafka's default). Any
# such message must fit in the dead-letter topic along with its reason headers, or its
# dead letter could never be written: the DLQ takes twice as much.
EVENT_MAX_BYTES = 1024 * 1024
DEAD_LETTER_MAX_BYTES = 2 * EVENT_MAX_BYTES


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics of contract section 3.

    `usage.events` gets `METERING_EVENTS_PARTITIONS` (default 6) partitions: the consumer
    group scales to that many writers, 6 divides evenly among 1, 2, 3 or 6 consumers, and
    since the key is org_id each organization stays on one partition (one writer, in order)
    whatever the count. The DLQ and limits topics carry little traffic: 3 partitions.
    """
    return [
        TopicSpec(
            settings.events_topic,
            settings.events_partitions,
            {
                "retention.ms": str(7 * 24 * 3600 * 1000),
                "min.insync.replicas": "1",
                "max.message.bytes": str(EVENT_MAX_BYTES),
            },
        ),
        TopicSpec(
            settings.dlq_topic,
            3,
            {
                "retention.ms": str(30 * 24 * 3600 * 1000),
                "max.message.bytes": str(DEAD_LETTER_MAX_BYTES),
            },
        ),
        TopicSpec(settings.limits_topic, 3, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
    ]


@contextlib.asynccontextmanager
async def _admin(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def ensure_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Create the topics that do not exist yet; return the names created now."""
    async with _admin(settings) as admin:
        existing = set(await admin.list_topics())
        wanted = [spec for spec in (specs or topic_specs(settings)) if spec.name not in existing]
        if not wanted:
            return []
        # another process may create the same topic at the same moment: that is fine
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(
                [NewTopic(s.name, s.partitions, 1, topic_configs=s.config) for s in wanted]
            )
        return [spec.name for spec in wanted]


async def _delete_where(settings: Settings, doomed: Callable[[str], bool]) -> list[str]:
    async with _admin(settings) as admin:
        names = sorted(t for t in await admin.list_topics() if doomed(t))
        if names:
            await admin.delete_topics(names)
        return names


async def delete_topics_with_prefix(settings: Settings, prefix: str) -> list[str]:
    """Delete every topic whose name starts with `prefix` (non-empty); return their names.

    For the throwaway topics of benchmarks (`bench.`): left behind, they pile up in the dev
    broker (thousands of partitions after a few days of work), and a benchmark then measures
    a busier broker than the one before.
    """
    if not prefix:
        raise ValueError("an empty prefix would delete every topic")
    return await _delete_where(settings, lambda name: name.startswith(prefix))


async def delete_topics(settings: Settings, names: list[str]) -> list[str]:
    """Delete the named topics that exist (tests delete the ones they made); return them."""
    wanted = set(names)
    return await _delete_where(settings, wanted.__contains__)


def committed_reader(
    settings: Settings, topic: str, *, offset_reset: str = "earliest"
) -> AIOKafkaConsumer:
    """A consumer of `topic` outside any group, committing nothing, that sees only committed
    messages: how the limits topic must be read, since crossings are published in Kafka
    transactions (a read_uncommitted reader would also see aborted ones)."""
    return AIOKafkaConsumer(
        topic,  # subscribed, so start() loads its partitions
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset=offset_reset,
        isolation_level="read_committed",
        enable_auto_commit=False,
        group_id=None,
    )
