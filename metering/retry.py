"""Retry with exponential back-off while a dependency is down: never skip, never give up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError

from metering.config import Settings
from metering.errors import DependencyUnavailable
from metering.metrics import DependencyMetrics
from metering.storage.pool import PERMANENT_DB_ERRORS, TRANSIENT_DB_ERRORS

T = TypeVar("T")
log = logging.getLogger("metering.retry")
# What a Kafka client raises while the broker is down or unreachable.
KAFKA_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (KafkaError, OSError, TimeoutError)


async def retry_until_done(
    operation: Callable[[], Awaitable[T]],
    *,
    dependency: str,
    transient: tuple[type[BaseException], ...],
    metrics: DependencyMetrics,
    min_delay: float,
    max_delay: float,
    permanent: tuple[type[BaseException], ...] = (),
) -> T:
    """Run `operation` until it succeeds, sleeping min_delay, 2x, 4x... up to max_delay
    after each transient failure. Other exceptions propagate at once, as do the subclasses
    of a transient class listed in `permanent`; cancellation (shutdown) propagates too, so
    nothing after the failed step runs.
    """
    delay = min_delay
    attempt = 0
    while True:
        try:
            result = await operation()
        except transient as error:
            if isinstance(error, permanent):
                raise
            attempt += 1
            metrics.retries.labels(dependency).inc()
            metrics.up.labels(dependency).set(0)
            unavailable = DependencyUnavailable(dependency, _describe(error), delay)
            log.warning(
                "%s (attempt %d); nothing is committed until it succeeds", unavailable, attempt
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        if attempt:
            log.warning("%s is back after %d retries; resuming", dependency, attempt)
        metrics.up.labels(dependency).set(1)
        return result


async def retry_postgres(
    operation: Callable[[], Awaitable[T]], *, settings: Settings, metrics: DependencyMetrics
) -> T:
    """`retry_until_done` for work on PostgreSQL: retried on TRANSIENT_DB_ERRORS, with the
    back-off of `settings`; any other error propagates at once."""
    return await retry_until_done(
        operation,
        dependency="postgres",
        transient=TRANSIENT_DB_ERRORS,
        permanent=PERMANENT_DB_ERRORS,
        metrics=metrics,
        min_delay=settings.retry_min_seconds,
        max_delay=settings.retry_max_seconds,
    )


async def retry_kafka(
    operation: Callable[[], Awaitable[T]], *, settings: Settings, metrics: DependencyMetrics
) -> T:
    """`retry_until_done` for work on Kafka: retried on KAFKA_TRANSIENT_ERRORS, with the
    back-off of `settings`; any other error propagates at once."""
    return await retry_until_done(
        operation,
        dependency="kafka",
        transient=KAFKA_TRANSIENT_ERRORS,
        metrics=metrics,
        min_delay=settings.retry_min_seconds,
        max_delay=settings.retry_max_seconds,
    )


def _describe(error: BaseException) -> str:
    """`Type: message`, once (aiokafka's errors already start their message with it)."""
    name, text = type(error).__name__, str(error)
    return text if text.startswith(name) else f"{name}: {text}"
