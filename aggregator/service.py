"""`metering aggregate`: the incremental aggregation loop and the crossing publisher.

Each pass is one transaction (storage.aggregates.AggregateStore.run_pass). Crossings are
written in that transaction (an outbox) and published to the limits topic after it
commits; a crossing is marked published only after Kafka acknowledged it, so a crash
between the two re-publishes it with the same deterministic id, and never loses it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, start_http_server

from aggregator.limits import Crossing, LimitUsage, crossings
from metering.config import Settings
from metering.metrics import AggregatorMetrics, observe_many
from metering.models import utc_now
from metering.retry import KAFKA_TRANSIENT_ERRORS, retry_postgres, retry_until_done
from metering.storage.aggregates import AggregateStore, PassResult
from metering.storage.pool import create_pool

T = TypeVar("T")
log = logging.getLogger("metering.aggregator")


def decide_crossings(usages: list[LimitUsage]) -> list[Crossing]:
    return crossings(usages, utc_now())


class Aggregator:
    """Runs passes back to back while there is work, every `idle_interval` otherwise."""

    def __init__(
        self,
        settings: Settings,
        store: AggregateStore,
        producer: AIOKafkaProducer | None,
        metrics: AggregatorMetrics,
        idle_interval: float = 0.1,
    ) -> None:
        self._settings = settings
        self._store = store
        self._producer = producer
        self._metrics = metrics
        self._idle_interval = idle_interval

    async def run_once(self) -> PassResult:
        """One pass, then publish what is pending; retried while a dependency is down."""
        started = time.perf_counter()
        budget = self._settings.aggregator_max_pass_events
        result = await self._retry_db(lambda: self._store.run_pass(decide_crossings, budget))
        self._metrics.pass_seconds.observe(time.perf_counter() - started)
        if not result.caught_up:
            log.info("catching up: aggregated %d events, more are waiting", result.events)
        self._metrics.events.inc(result.events)
        for age, count in result.ages:
            observe_many(self._metrics.freshness, age, count)
        for crossing in result.new_crossings:
            self._metrics.crossings.labels(
                crossing.feature_key, str(crossing.threshold_percent)
            ).inc()
            log.info(
                "limit crossing: org %s %s %s%% (%s of %s)",
                crossing.org_id,
                crossing.feature_key,
                crossing.threshold_percent,
                crossing.used,
                crossing.limit,
            )
        if self._producer is not None:
            await self.publish_pending()
        self._metrics.watermark_lag.set(await self._retry_db(self._store.watermark_lag_seconds))
        return result

    async def publish_pending(self) -> int:
        """Publish unpublished crossings (acks=all), then mark them; return how many."""
        assert self._producer is not None
        producer = self._producer
        total = 0
        while pending := await self._retry_db(self._store.unpublished):
            await retry_until_done(
                functools.partial(self._send_crossings, producer, pending),
                dependency="kafka",
                transient=KAFKA_TRANSIENT_ERRORS,
                metrics=self._metrics.dependencies,
                min_delay=self._settings.retry_min_seconds,
                max_delay=self._settings.retry_max_seconds,
            )
            await self._retry_db(
                functools.partial(self._store.mark_published, [c.id for c in pending])
            )
            self._metrics.published.inc(len(pending))
            total += len(pending)
        return total

    async def _send_crossings(self, producer: AIOKafkaProducer, batch: list[Crossing]) -> None:
        futures = [
            await producer.send(
                self._settings.limits_topic,
                value=json.dumps(c.message()).encode(),
                key=str(c.org_id).encode(),
            )
            for c in batch
        ]
        await asyncio.gather(*futures)

    async def run_forever(self) -> None:
        while True:
            result = await self.run_once()
            if result.events == 0:
                await asyncio.sleep(self._idle_interval)

    async def _retry_db(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry_postgres(
            operation, settings=self._settings, metrics=self._metrics.dependencies
        )


async def run_aggregator(settings: Settings, *, once: bool = False) -> PassResult | None:
    """Run passes until cancelled (SIGINT/SIGTERM), or one pass with `once`.

    Owns the pool, the producer and the metrics server, and closes them on the way out.
    """
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry)
    server = thread = None
    if not once:
        server, thread = start_http_server(settings.metrics_port, registry=registry)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    # No statement timeout: a pass cancelled by one would be retried over the same events,
    # forever. Passes are bounded by aggregator_max_pass_events instead.
    pool = await retry_postgres(
        lambda: create_pool(settings, max_size=2, command_timeout=None),
        settings=settings,
        metrics=metrics.dependencies,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
    )
    try:
        await retry_until_done(
            producer.start,
            dependency="kafka",
            transient=KAFKA_TRANSIENT_ERRORS,
            metrics=metrics.dependencies,
            min_delay=settings.retry_min_seconds,
            max_delay=settings.retry_max_seconds,
        )
        aggregator = Aggregator(settings, AggregateStore(pool), producer, metrics)
        if once:
            return await aggregator.run_once()
        log.info("aggregating into usage_aggregations; crossings to %s", settings.limits_topic)
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, main.cancel)
        try:
            await aggregator.run_forever()
        except asyncio.CancelledError:
            # a pass cut short rolls back whole; the next start redoes it
            log.info("stopping: signal received")
        return None
    finally:
        await producer.stop()
        await pool.close()
        if server is not None and thread is not None:
            server.shutdown()
            thread.join(timeout=5)
