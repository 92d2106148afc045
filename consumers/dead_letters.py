"""Publishing invalid messages to the dead-letter topic, unchanged, with their reason."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from metering.config import Settings
from metering.topics import DEAD_LETTER_MAX_BYTES

log = logging.getLogger("metering.consumer")
# Dead letters are logged as a count per reason per this many seconds, not a line each.
DEAD_LETTER_LOG_SECONDS = 10.0

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


class DeadLetterLog:
    """Logs dead letters as one line per interval: how many, per code, and one example.

    A flood of bad messages (960,000 in one test) logged line by line cost 135 MB of log and
    delayed the good events behind them; the metric `metering_events_dead_lettered_total`
    counts every one, the log says what is happening. The first dead letter after a quiet
    interval is logged at once; those that follow within `interval` are summed into the line
    `flush` writes (called on the next dead letter after the interval, by the consumer's
    periodic task, and at shutdown).
    """

    def __init__(
        self,
        interval: float = DEAD_LETTER_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._log = logger
        self._counts: Counter[str] = Counter()
        self._example: DeadLetter | None = None
        self._since: float | None = None  # when the current interval began

    def record(self, letters: list[DeadLetter]) -> None:
        if not letters:
            return
        now = self._clock()
        if self._since is not None and now - self._since >= self._interval:
            self.flush()
        if self._since is None:
            self._since = now
            first = letters[0]
            self._log.warning("dead-lettered %s", _describe(first))
            letters = letters[1:]
        for letter in letters:
            self._counts[letter.code] += 1
            if self._example is None:
                self._example = letter

    def flush(self) -> None:
        """Log what was counted since the interval began, if anything; start a new one."""
        if self._counts and self._example is not None:
            total = sum(self._counts.values())
            by_code = ", ".join(f"{code} {count}" for code, count in self._counts.most_common())
            self._log.warning(
                "dead-lettered %d more messages in the last %.0f s (%s); e.g. %s",
                total,
                self._clock() - (self._since or 0.0),
                by_code,
                _describe(self._example),
            )
        self._counts.clear()
        self._example = None
        self._since = None

    async def flush_every(self, seconds: float | None = None) -> None:
        """Flush every `seconds` (default: the interval) until cancelled."""
        while True:
            await asyncio.sleep(seconds or self._interval)
            if self._since is not None and self._clock() - self._since >= self._interval:
                self.flush()


def _describe(letter: DeadLetter) -> str:
    return (
        f"{letter.topic}[{letter.partition}]@{letter.offset}: {letter.code} ({letter.reason[:300]})"
    )
