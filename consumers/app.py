"""`metering consume`: the FastStream batch subscriber on the events topic.

Transport only: it hands each batch of raw records to `BatchWriter` and lets FastStream
commit the offsets after the handler returns (AckPolicy.NACK_ON_ERROR: on an exception the
consumer seeks back to the batch's first record of each partition and nothing is committed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import CollectorRegistry, start_http_server

from consumers.dead_letters import DeadLetterPublisher
from consumers.writer import BatchWriter
from metering.config import Settings
from metering.meters.registry import AcceptedTypes
from metering.metrics import ConsumerMetrics, DependencyMetrics
from metering.retry import KAFKA_TRANSIENT_ERRORS, retry_kafka, retry_postgres
from metering.storage.events import EventStore
from metering.storage.pool import create_pool

log = logging.getLogger("metering.consumer")
# Least privilege: the writer may insert events and first subscriptions, nothing else.
WRITER_ROLE = "metering_writer"
# After an unexpected error the batch is re-read; wait so a poison bug cannot spin the CPU.
UNEXPECTED_ERROR_PAUSE_SECONDS = 2.0
# How often a running consumer makes sure next months' partitions exist.
PARTITION_CHECK_SECONDS = 3600.0
# How often a running consumer asks the broker whether it is there (one metadata request).
KAFKA_PROBE_SECONDS = 2.0


async def keep_partitions_ahead(
    store: EventStore, every_seconds: float = PARTITION_CHECK_SECONDS
) -> None:
    """Every `every_seconds`, create the monthly partitions from two months back to two
    months ahead, so a consumer that runs for months never writes into the default
    partition (retention cannot drop its rows, and creating the month's partition later
    has to move them all under lock). An error is logged and the next tick tries again:
    nothing waits on this, and a missing partition loses nothing (the default takes the
    rows). Runs until cancelled."""
    while True:
        await asyncio.sleep(every_seconds)
        try:
            created = await store.ensure_partitions_around_today()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not create next months' partitions; will try again")
            continue
        if created:
            log.info("created %d monthly partitions of usage_events ahead of time", created)


async def watch_kafka(
    probe: Callable[[], Awaitable[None]],
    settings: Settings,
    metrics: DependencyMetrics,
    every_seconds: float = KAFKA_PROBE_SECONDS,
) -> None:
    """Make a broker outage visible. While Kafka is down the subscriber's client retries on
    its own and the handler is simply not called, so nothing of ours would say so: every
    `every_seconds` this probes the broker, and while it does not answer it logs
    "kafka unavailable ... (attempt n)" with back-off, holds
    `metering_dependency_up{dependency="kafka"}` at 0 and counts
    `metering_dependency_retries_total`, then logs "kafka is back". Offsets cannot be
    committed meanwhile, so nothing is skipped; the operator need only bring the broker
    back. Runs until cancelled."""
    while True:
        await retry_kafka(
            probe,
            settings=settings,
            metrics=metrics,
        )
        await asyncio.sleep(every_seconds)


async def _report_lag(consumer: Any, metrics: ConsumerMetrics) -> None:
    for partition in consumer.assignment():
        high = consumer.highwater(partition)
        if high is None:
            continue
        position = await consumer.position(partition)
        metrics.lag.labels(partition.topic, str(partition.partition)).set(max(high - position, 0))


async def tolerate_any_headers(records: Any, original_parser: Any) -> Any:
    """FastStream's parser decodes every header value as UTF-8 and fails the whole batch on
    one that is not, forever (a poison message blocking its partition, and the good events
    with it). Header values are not part of a usage event: make them decodable first."""
    batch = records if isinstance(records, tuple) else (records,)
    cleaned = tuple(_decodable_headers(record) for record in batch)
    return await original_parser(cleaned if isinstance(records, tuple) else cleaned[0])


def _decodable_headers(record: Any) -> Any:
    headers = record.headers or ()
    try:
        for _, value in headers:
            (value or b"").decode("utf-8")
    except UnicodeDecodeError:
        fixed = [
            (name, (value or b"").decode("utf-8", "replace").encode()) for name, value in headers
        ]
        return dataclasses.replace(record, headers=fixed)
    return record


async def keep_raw_records(message: Any) -> Any:
    """FastStream decoder that skips decoding: the handler validates the raw bytes itself
    (FastStream's default JSON-decodes every message, ~30% of the consumer's CPU)."""
    return message.raw_message


def build_consumer(settings: Settings, registry: CollectorRegistry | None = None) -> FastStream:
    """The writer application: broker, subscriber, and a lifespan owning pool and producer."""
    registry = registry or CollectorRegistry()
    metrics = ConsumerMetrics(registry)
    broker = KafkaBroker(
        settings.kafka_bootstrap_servers,
        middlewares=[KafkaPrometheusMiddleware(registry=registry, app_name="metering-consumer")],
        log_level=logging.DEBUG,
    )
    state: dict[str, BatchWriter] = {}

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        server, thread = start_http_server(settings.metrics_port, registry=registry)
        log.info("metrics on :%d/metrics", settings.metrics_port)
        dependencies = metrics.dependencies
        pool = await retry_postgres(
            lambda: create_pool(settings, max_size=4, role=WRITER_ROLE),
            settings=settings,
            metrics=dependencies,
        )
        store = EventStore(pool)
        await store.ensure_partitions_around_today()
        stack = AsyncExitStack()
        dead_letters = DeadLetterPublisher(settings)
        await retry_kafka(
            dead_letters.start,
            settings=settings,
            metrics=dependencies,
        )
        accepted_types = await retry_postgres(
            lambda: stack.enter_async_context(AcceptedTypes.following(settings)),
            settings=settings,
            metrics=dependencies,
        )
        writer = state["writer"] = BatchWriter(
            settings, store, dead_letters, metrics, KAFKA_TRANSIENT_ERRORS, accepted_types
        )
        log.info(
            "consuming %s as group %s into %s",
            settings.events_topic,
            settings.consumer_group,
            settings.database_name,
        )
        background = [
            asyncio.create_task(keep_partitions_ahead(store)),
            asyncio.create_task(watch_kafka(dead_letters.probe, settings, dependencies)),
            asyncio.create_task(writer.dead_letter_log.flush_every()),
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            writer.dead_letter_log.flush()
            await dead_letters.stop()
            await stack.aclose()
            await pool.close()
            server.shutdown()
            thread.join(timeout=5)

    @broker.subscriber(
        settings.events_topic,
        group_id=settings.consumer_group,
        batch=True,
        max_records=settings.consumer_batch_size,
        batch_timeout_ms=settings.consumer_batch_timeout_ms,
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=keep_raw_records,
        parser=tolerate_any_headers,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_wait_ms=50,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=2_000,
    )
    async def write_usage_events(message: KafkaMessage) -> None:
        records = message.raw_message
        if not isinstance(records, tuple):
            records = (records,)
        try:
            outcome = await state["writer"].process(records)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error writing a batch; it will be read again")
            await asyncio.sleep(UNEXPECTED_ERROR_PAUSE_SECONDS)
            raise
        log.debug("batch: %s", outcome)
        await _report_lag(message.consumer, metrics)

    return FastStream(broker, lifespan=lifespan)


async def run_consumer(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM; in-flight batches finish or are re-read after restart."""
    await build_consumer(settings).run()
