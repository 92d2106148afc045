"""The producer client for services that publish usage to Kafka.

    async with UsageClient(settings) as client:
        await client.send(org_id=org, type="api_call", quantity=3)

Events are validated before they leave the caller (a bad one raises `InvalidEvent` there),
keyed by org_id, and sent with acks=all by the idempotent producer; `close()` flushes.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any
from uuid import UUID

import uuid_utils
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from metering.config import Settings
from metering.errors import DependencyUnavailable
from metering.models import UsageEvent, utc_now, validate_event
from metering.partitioner import OrgKeyPartitioner


def new_event_id() -> str:
    """A time-ordered UUIDv7, so ids sort by creation time and index well."""
    return str(uuid_utils.uuid7())


class UsageClient:
    """Async publisher of usage events (one producer, batching, flush on close)."""

    def __init__(self, settings: Settings, *, linger_ms: int = 5) -> None:
        self._settings = settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_batch_size=256 * 1024,
            compression_type=None,
            request_timeout_ms=30_000,
            partitioner=OrgKeyPartitioner(),
        )

    async def __aenter__(self) -> UsageClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to Kafka. Raises DependencyUnavailable when no bootstrap server answers
        (the producer is closed again; try later, or check METERING_KAFKA_BOOTSTRAP_SERVERS)."""
        try:
            await self._producer.start()
        except KafkaError as error:
            await self._producer.stop()
            raise DependencyUnavailable(
                "kafka",
                f"no broker at {self._settings.kafka_bootstrap_servers} answered ({error})",
                self._settings.retry_max_seconds,
            ) from None

    async def close(self) -> None:
        """Flush what is buffered, then close. Safe to call twice."""
        await self._producer.flush()
        await self._producer.stop()

    def build(
        self,
        *,
        org_id: UUID | str,
        type: str,
        quantity: int | Decimal = 1,
        user_id: UUID | str | None = None,
        occurred_at: datetime | None = None,
        id: str | None = None,
        metadata: dict[str, Any] | None = None,
        now: datetime | None = None,
    ) -> UsageEvent:
        """Build and validate an event exactly as the consumer will; raise `InvalidEvent`."""
        document = {
            "id": id if id is not None else new_event_id(),
            "type": type,
            "org_id": str(org_id),
            "user_id": str(user_id) if user_id is not None else None,
            "quantity": quantity,
            "occurred_at": (occurred_at or utc_now()).isoformat(),
            "metadata": metadata,
        }
        return validate_event(
            document,
            now=now or utc_now(),
            lateness_window=self._settings.lateness_window,
            future_tolerance=self._settings.future_tolerance,
        )

    async def send_event(self, event: UsageEvent) -> None:
        """Queue a validated event; returns once the broker has it (acks=all)."""
        future = await self._producer.send(
            self._settings.events_topic, value=event.to_json(), key=event.partition_key()
        )
        await future

    async def enqueue(self, event: UsageEvent) -> Any:
        """Queue without waiting for the ack; await the returned future (or `flush`) later."""
        return await self._producer.send(
            self._settings.events_topic, value=event.to_json(), key=event.partition_key()
        )

    async def send_raw(self, value: bytes, key: bytes | None) -> None:
        """Publish bytes unvalidated (tests and tools that must produce bad input)."""
        await (await self._producer.send(self._settings.events_topic, value=value, key=key))

    async def flush(self) -> None:
        await self._producer.flush()

    async def send(self, **fields: Any) -> UsageEvent:
        """Validate, publish and wait for the ack; return the event as sent (with its id)."""
        event = self.build(**fields)
        await self.send_event(event)
        return event
