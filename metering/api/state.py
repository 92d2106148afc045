"""What the API's lifespan owns, typed: the pool, the producer and the stores built on them."""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry

from metering.api.observability import ApiMetrics
from metering.config import Settings
from metering.corrections.cancel import CancelStore
from metering.kafka_batches import EventPublisher, events_producer
from metering.limits.crossings import CrossingStore
from metering.limits.overrides import OverrideStore
from metering.meters.registry import AcceptedTypes
from metering.meters.store import MeterStore
from metering.meters.usage_store import MeterUsageStore
from metering.partitioner import OrgKeyPartitioner
from metering.portal.overview import MetricsSampler
from metering.portal.page_cache import PageCache
from metering.portal.tokens import PortalTokenStore, hidden_limits
from metering.storage.audit import AuditLog
from metering.storage.keys import ApiKey, KeyStore
from metering.storage.pool import create_pool
from metering.storage.reads import ReadStore, SubscriptionStore
from metering.webhooks.store import WebhookStore

# Bodies larger than INLINE_BODY_BYTES are validated in a worker thread, at most this many
# at a time (routes/ingest.py).
PARALLEL_LARGE_BODIES = 2


@dataclass
class AppState:
    """One per process, on `app.state.metering` while the app runs."""

    settings: Settings
    registry: CollectorRegistry
    metrics: ApiMetrics
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    publisher: EventPublisher
    keys: KeyStore
    reads: ReadStore
    subscriptions: SubscriptionStore
    meters: MeterStore
    meter_usage: MeterUsageStore
    accepted_types: AcceptedTypes
    audit: AuditLog
    cancels: CancelStore
    webhooks: WebhookStore
    overrides: OverrideStore
    portal_tokens: PortalTokenStore
    crossings: CrossingStore
    sampler: MetricsSampler
    pages: PageCache
    parsing: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(PARALLEL_LARGE_BODIES)
    )

    async def hidden_features(self, key: ApiKey) -> frozenset[str]:
        """The limits `key` may not see: those counted by a meter it may not read (only a
        portal token with a list of meters has any)."""
        if key.meters is None:
            return frozenset()
        return hidden_limits(key, await self.meters.list())


def lifespan_for(
    settings: Settings, registry: CollectorRegistry, metrics: ApiMetrics
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The lifespan that opens, publishes on `app.state.metering` and closes what AppState
    holds."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await create_pool(settings, max_size=10)
        partitioner = OrgKeyPartitioner()
        producer = events_producer(settings, partitioner)
        await producer.start()
        publisher = EventPublisher(producer, partitioner, settings.events_topic)
        stack = AsyncExitStack()
        accepted_types = await stack.enter_async_context(AcceptedTypes.following(settings))
        audit = AuditLog(pool)
        keys = await stack.enter_async_context(
            KeyStore(pool).following_revocations(settings.database_url.get_secret_value())
        )
        sampler = await stack.enter_async_context(
            MetricsSampler(settings.overview_metrics_url_list).running()
        )
        app.state.metering = AppState(
            settings=settings,
            registry=registry,
            metrics=metrics,
            pool=pool,
            producer=producer,
            publisher=publisher,
            keys=keys,
            reads=ReadStore(pool),
            subscriptions=SubscriptionStore(pool),
            meters=MeterStore(pool),
            meter_usage=MeterUsageStore(pool),
            accepted_types=accepted_types,
            audit=audit,
            cancels=CancelStore(pool, audit, settings.lateness_window),
            webhooks=WebhookStore(pool),
            overrides=OverrideStore(pool, audit),
            portal_tokens=PortalTokenStore(pool, audit),
            crossings=CrossingStore(pool),
            sampler=sampler,
            pages=PageCache(),
        )
        try:
            yield
        finally:
            await stack.aclose()
            await publisher.close()
            await producer.stop()
            await pool.close()

    return lifespan


def state_of(request: Request) -> AppState:
    """This process's AppState. Read in the handler, not injected: each FastAPI dependency
    costs the access check CPU (a plain `def` one even a worker thread)."""
    state = request.app.state.metering
    assert isinstance(state, AppState)
    return state
