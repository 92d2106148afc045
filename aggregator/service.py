"""`metering aggregate`: the incremental aggregation loop and the crossing publisher.

Each pass is one transaction (aggregator.store.AggregateStore.run_pass). Crossings are
written in that transaction (an outbox) and published to the limits topic after it
commits, exactly once (aggregator.publisher: Kafka transactions, fencing, and a read-back
of the topic after a restart). One aggregator leads at a time (storage.lease); others
stand by and take over when its PostgreSQL session ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, start_http_server

from aggregator.backfill import Backfiller
from aggregator.meter_loop import MeterCounter, decide_crossings
from aggregator.meter_store import MeterPassStore
from aggregator.publisher import CrossingPublisher
from aggregator.store import AggregateStore, PassResult
from metering.config import Settings
from metering.errors import AggregatorNotActive
from metering.metrics import AggregatorMetrics, observe_many
from metering.retry import KAFKA_TRANSIENT_ERRORS, retry_kafka, retry_postgres
from metering.storage.lease import AggregatorLease
from metering.storage.pool import create_pool

T = TypeVar("T")
log = logging.getLogger("metering.aggregator")


class Aggregator:
    """Runs passes back to back while there is work, every `idle_interval` otherwise."""

    def __init__(
        self,
        settings: Settings,
        store: AggregateStore,
        publisher: CrossingPublisher | None,
        metrics: AggregatorMetrics,
        idle_interval: float = 0.1,
        lease: AggregatorLease | None = None,
        backfiller: Backfiller | None = None,
    ) -> None:
        """`publisher` None: crossings are recorded, not published. `lease` None: the
        caller guarantees that no other aggregator runs (tests)."""
        self._settings = settings
        self._store = store
        self._publisher = publisher
        self._metrics = metrics
        self._idle_interval = idle_interval
        self._lease = lease
        self.meters = MeterCounter(
            settings,
            MeterPassStore(store.pool),
            backfiller or Backfiller(store.pool),
            metrics,
            idle_interval,
        )

    @property
    def backfilling(self) -> bool:
        """A backfill chunk ran in the last run_once."""
        return self.meters.backfilling

    async def run_once(self, *, publish: bool = True) -> PassResult:
        """One v1 pass and one meter pass (with a backfill chunk), then (with `publish`)
        publish what is pending; retried while a dependency is down. Raises
        AggregatorNotActive once this aggregator no longer leads."""
        result = await self._run_usage_pass()
        await self.meters.run_once()
        if publish and self._publisher is not None:
            await self.publish_pending()
        return result

    async def _run_usage_pass(self) -> PassResult:
        """One v1 pass (the seeded meters, their limits and crossings)."""
        if self._lease is not None:
            await self._lease.check()
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
        self._metrics.watermark_lag.set(await self._retry_db(self._store.watermark_lag_seconds))
        return result

    async def publish_pending(self) -> int:
        """Publish every unpublished crossing, a batch per Kafka transaction, marking each
        batch published after it committed; return how many were sent."""
        total = 0
        while sent := await retry_kafka(
            self._publish_batch,
            settings=self._settings,
            metrics=self._metrics.dependencies,
        ):
            self._metrics.published.inc(sent)
            total += sent
        return total

    async def _publish_batch(self) -> int:
        publisher = self._publisher
        assert publisher is not None
        if not publisher.started:
            if self._lease is not None:
                await self._lease.check()  # else starting would fence the leader's producer
            await publisher.start()  # fences every older aggregator's producer
            await self._mark_what_predecessors_published(publisher)
        pending = await self._retry_db(self._store.unpublished)
        if not pending:
            return 0
        try:
            await publisher.publish(pending)
        except KAFKA_TRANSIENT_ERRORS:
            # the transaction's outcome may be unknown: the next attempt starts a new
            # producer, which settles it, and reads back what it committed
            await publisher.stop()
            raise
        await self._retry_db(functools.partial(self._store.mark_published, [c.id for c in pending]))
        return len(pending)

    async def _mark_what_predecessors_published(self, publisher: CrossingPublisher) -> None:
        oldest = await self._retry_db(self._store.oldest_unpublished)
        if oldest is None:
            return
        found = await publisher.published_since(oldest)
        marked = await self._retry_db(functools.partial(self._store.mark_published, list(found)))
        if marked:
            log.info(
                "%d crossings were already on %s (committed before a restart): marked "
                "published, not sent again",
                marked,
                self._settings.limits_topic,
            )

    async def run_forever(self) -> None:
        """Passes back to back while there is work, every `idle_interval` otherwise, until
        cancelled or AggregatorNotActive. Crossings are published by a task of their own,
        woken after each pass: while Kafka cannot take them they wait in the outbox, and
        usage_aggregations (what the access check and billing read) keeps up with the
        stored events all the same."""
        passed = asyncio.Event()
        publishing = (
            asyncio.create_task(self._publish_after_passes(passed))
            if self._publisher is not None
            else None
        )
        counting = asyncio.create_task(self.meters.run_forever(passed))
        try:
            while True:
                if publishing is not None and publishing.done():
                    publishing.result()  # AggregatorNotActive (fenced), or a bug: stop
                if counting.done():
                    counting.result()  # a bug in the meter loop: stop, say why
                result = await self._run_usage_pass()
                passed.set()
                if result.events == 0:
                    await asyncio.sleep(self._idle_interval)
        finally:
            for task in (publishing, counting):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _publish_after_passes(self, passed: asyncio.Event) -> None:
        while True:
            await passed.wait()
            passed.clear()
            await self.publish_pending()

    async def _retry_db(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry_postgres(
            operation, settings=self._settings, metrics=self._metrics.dependencies
        )


async def run_aggregator(settings: Settings, *, once: bool = False) -> PassResult | None:
    """Run passes until cancelled (SIGINT/SIGTERM), or one pass with `once`.

    Leads or stands by: one aggregator at a time runs passes and publishes; another waits
    for the lead and takes over when the leader's PostgreSQL session ends. With `once`,
    raise AggregatorNotActive if another aggregator leads. Owns the pool, the lock
    connection, the producer and the metrics server, and closes them on the way out.
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
    lease = AggregatorLease(settings)
    publisher = CrossingPublisher(settings)
    aggregator = Aggregator(settings, AggregateStore(pool), publisher, metrics, lease=lease)
    try:
        if once:
            if not await _try_lead(settings, lease, metrics):
                raise AggregatorNotActive("another aggregator leads", await lease.holder())
            return await aggregator.run_once()
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Once: Ctrl-C reaches the whole process group and `metering run` sends SIGTERM
            # after it; a second cancel would cut short the close of the lock session.
            loop.add_signal_handler(signum, _cancel_once, main)
        try:
            while True:
                await _take_the_lead(settings, lease, metrics)
                log.info(
                    "leading: aggregating into usage_aggregations; crossings to %s",
                    settings.limits_topic,
                )
                try:
                    await aggregator.run_forever()
                except AggregatorNotActive as lost:
                    log.warning("%s; standing by", lost)
                    metrics.active.set(0)
                    await publisher.stop()
                    await lease.release()
        except asyncio.CancelledError:
            # a pass cut short rolls back whole; the next start redoes it
            log.info("stopping: signal received")
        return None
    finally:
        await publisher.stop()
        await lease.release()
        await pool.close()
        if server is not None and thread is not None:
            server.shutdown()
            thread.join(timeout=5)


def _cancel_once(task: asyncio.Task[object]) -> None:
    if not task.cancelling():
        task.cancel()


async def _try_lead(settings: Settings, lease: AggregatorLease, metrics: AggregatorMetrics) -> bool:
    return await retry_postgres(lease.try_acquire, settings=settings, metrics=metrics.dependencies)


async def _take_the_lead(
    settings: Settings, lease: AggregatorLease, metrics: AggregatorMetrics
) -> None:
    """Return once this process leads; until then wait for the leader's session to end."""
    if not await _try_lead(settings, lease, metrics):
        log.info("standing by: another aggregator leads (%s)", await lease.holder())
        await retry_postgres(lease.wait, settings=settings, metrics=metrics.dependencies)
    metrics.active.set(1)
