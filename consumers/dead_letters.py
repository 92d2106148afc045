"""Publishing invalid messages to the dead-letter topic, unchanged, with their reason."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from metering.config import Settings
from metering.topics import DEAD_LETTER_MAX_BYTES

# A broker that does not answer a metadata request within this is counted as down.
PROBE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class DeadLetter:
    """A message that broke contract section 1, and where it was read from."""

    value: bytes | None
    key: bytes | None
    code: str
    reason: str
    topic: str
    partition: int
    offset: int

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("error.code", self.code.encode()),
            ("error.reason", self.reason.encode("utf-8", "replace")[:1000]),
            ("source.topic", self.topic.encode()),
            ("source.partition", str(self.partition).encode()),
            ("source.offset", str(self.offset).encode()),
        ]


class DeadLetterPublisher:
    """Sends dead letters with acks=all and returns only when the broker has them all."""

    def __init__(self, settings: Settings) -> None:
        self._topic = settings.dlq_topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            # the original message plus its headers (see metering.topics.EVENT_MAX_BYTES)
            max_request_size=DEAD_LETTER_MAX_BYTES,
            request_timeout_ms=10_000,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def probe(self) -> None:
        """Ask the broker for cluster metadata; raise KafkaError (or TimeoutError after
        PROBE_TIMEOUT_SECONDS) when no broker answers."""
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            await self._producer.client.fetch_all_metadata()

    async def publish(self, letters: list[DeadLetter]) -> None:
        """Publish all of `letters`; raise if any was not acknowledged (the caller retries
        the whole list: the DLQ may then hold a copy twice, never zero times)."""
        if not letters:
            return
        futures = [
            await self._producer.send(
                self._topic, value=letter.value, key=letter.key, headers=letter.headers()
            )
            for letter in letters
        ]
        await asyncio.gather(*futures)
