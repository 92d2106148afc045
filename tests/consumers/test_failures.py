"""Crashes and outages mid-stream on the real broker and database: nothing lost, nothing twice.

Each test publishes a known stream, starts the consumer with small batches so it takes a
few seconds, hits it (or a dependency) while the table is part-way filled, recovers, and
then requires the table to hold exactly the distinct valid events.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer

from metering.config import Settings
from metering.devenv.services import DevServices
from tests.conftest import ConsumerProcess, async_wait_for
from tests.consumers.conftest import (
    PublishedStream,
    assert_exact,
    publish_stream,
    scrape,
    stored_count,
    stored_keys,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]
EVENTS = 20_000
KAFKA_UP = 'metering_dependency_up{dependency="kafka"}'
KAFKA_RETRIES = 'metering_dependency_retries_total{dependency="kafka"}'


async def wait_until_partly_stored(dsn: str, stream: PublishedStream, fraction: float) -> int:
    target = int(len(stream.expected_keys) * fraction)

    async def reached() -> int:
        count = await stored_count(dsn, stream.orgs)
        return count if count >= target else 0

    await async_wait_for(reached, 60, f"{fraction:.0%} of the events stored", interval=0.05)
    count = await stored_count(dsn, stream.orgs)
    assert count < len(stream.expected_keys), "the stream finished before the fault: not mid-stream"
    return count


async def wait_until_complete_and_settled(
    dsn: str, stream: PublishedStream, timeout: float = 120
) -> None:
    async def complete() -> bool:
        return await stored_count(dsn, stream.orgs) >= len(stream.expected_keys)

    await async_wait_for(complete, timeout, "every event stored")
    await asyncio.sleep(1.5)  # any double write would show up after the count is reached
    assert_exact(await stored_keys(dsn, stream.orgs), stream)


async def test_sigkill_mid_stream_then_restart(
    small_batches: Settings,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    stream = await publish_stream(producer, small_batches, events=EVENTS, seed=11)
    first = start_consumer(small_batches)
    await wait_until_partly_stored(migrated_database, stream, 0.3)
    first.kill()
    assert first.process.returncode == -signal.SIGKILL, "the consumer must die by the kill"
    start_consumer(small_batches)
    await wait_until_complete_and_settled(migrated_database, stream)


async def test_postgres_stopped_mid_stream(
    small_batches: Settings,
    producer: AIOKafkaProducer,
    dev_services: DevServices,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    stream = await publish_stream(producer, small_batches, events=EVENTS, seed=12)
    consumer = start_consumer(small_batches)
    await wait_until_partly_stored(migrated_database, stream, 0.3)
    await asyncio.to_thread(dev_services.stop_postgres, mode="immediate")
    await asyncio.sleep(3)  # the consumer keeps polling Kafka and must retry, not skip
    await asyncio.to_thread(dev_services.start_postgres)
    await wait_until_complete_and_settled(migrated_database, stream)
    assert consumer.process.poll() is None, "the consumer must survive the outage"
    log = consumer.log_text()
    assert "postgres unavailable" in log and "postgres is back" in log
    # an outage is expected, not a bug: one line per retry, no traceback to wade through
    assert "Traceback" not in log, log[-3000:]


async def test_kafka_restarted_mid_stream(
    small_batches: Settings,
    producer: AIOKafkaProducer,
    dev_services: DevServices,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    stream = await publish_stream(producer, small_batches, events=EVENTS, seed=13)
    consumer = start_consumer(small_batches)
    await wait_until_partly_stored(migrated_database, stream, 0.3)
    await asyncio.to_thread(dev_services.stop_kafka)

    async def kafka_reported(up: float) -> bool:
        return (await asyncio.to_thread(scrape, consumer.metrics_port)).get(KAFKA_UP) == up

    await async_wait_for(lambda: kafka_reported(0.0), 20, "the consumer to report Kafka down")
    await asyncio.to_thread(dev_services.start_kafka)
    await wait_until_complete_and_settled(migrated_database, stream)
    assert consumer.process.poll() is None, "the consumer must survive the broker restart"
    await async_wait_for(lambda: kafka_reported(1.0), 20, "the consumer to report Kafka back")
    assert scrape(consumer.metrics_port)[KAFKA_RETRIES] >= 1
    log = consumer.log_text()
    assert "kafka unavailable" in log and "kafka is back" in log, log[-3000:]
    # aiokafka logs each failed reconnect (~60 lines a second); identical lines come once
    library_lines = Counter(
        line.split(" ", 2)[2] for line in log.splitlines() if " aiokafka" in line
    )
    assert library_lines, "the outage should have been logged by aiokafka too"
    assert max(library_lines.values()) == 1, library_lines.most_common(3)


async def test_two_consumers_one_killed_rebalances(
    small_batches: Settings,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    stream = await publish_stream(producer, small_batches, events=EVENTS, seed=14)
    first = start_consumer(small_batches)
    second = start_consumer(small_batches)
    await wait_until_partly_stored(migrated_database, stream, 0.3)
    first.kill()
    await wait_until_complete_and_settled(migrated_database, stream)
    assert second.process.poll() is None
    assert "assigned to partitions" in second.log_text()


async def test_three_consumers_on_six_partitions_started_and_stopped_in_turn(
    small_batches: Settings,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
    migrated_database: str,
) -> None:
    """The scaling path of docs/scaling.md: members join and leave while the stream flows."""
    stream = await publish_stream(producer, small_batches, events=30_000, seed=15)
    first = start_consumer(small_batches)
    await wait_until_partly_stored(migrated_database, stream, 0.1)
    second = start_consumer(small_batches)
    await wait_until_partly_stored(migrated_database, stream, 0.25)
    third = start_consumer(small_batches)
    await wait_until_partly_stored(migrated_database, stream, 0.4)
    assert first.stop() == 0  # graceful leave
    await wait_until_partly_stored(migrated_database, stream, 0.55)
    second.kill()  # crash
    await wait_until_partly_stored(migrated_database, stream, 0.7)
    start_consumer(small_batches)  # a replacement joins
    await wait_until_complete_and_settled(migrated_database, stream)
    assert third.process.poll() is None
    assert "assigned to partitions" in third.log_text()
