"""One consumed batch: validate every message, store the valid ones, dead-letter the rest.

The order is fixed, and the Kafka offsets of the batch are committed by the caller only
after `process` returns:

    1. validate   (pure; never raises)
    2. write      the valid events to Postgres in ONE transaction (retried until it commits;
                  should PostgreSQL refuse an event's data, that event is set aside as a
                  dead letter and the others are written, see _write_setting_refused_aside)
    3. dead-letter the invalid messages, acknowledged by Kafka (retried until acked)
    4. return     -> the subscriber commits the offsets

Why this order: an offset committed before step 2 or 3 would let a crash lose the batch
(Kafka would not deliver it again). Committing after means a crash between 2 and 4 delivers
the batch again; the dedupe constraint in step 2 makes that replay store nothing twice.
So the pipeline is at-least-once delivery plus idempotent writes: exactly-once storage.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from consumers.dead_letters import DeadLetter, DeadLetterLog, DeadLetterPublisher
from metering.config import Settings
from metering.errors import InvalidEvent
from metering.meters.registry import AcceptedTypes
from metering.metrics import ConsumerMetrics
from metering.models import SEEDED_TYPES, accepted_at, parse_event, utc_now
from metering.retry import retry_postgres, retry_until_done
from metering.storage.events import REFUSED_BY_DATABASE, EventStore, IncomingEvent, WriteResult

T = TypeVar("T")
log = logging.getLogger("metering.consumer")
# Events validated per statement: big enough to amortise a round trip, small enough that
# validating the next chunk overlaps the database writing this one.
VALIDATION_CHUNK = 1000
# The dead-letter code of an event that broke no rule but could not be prepared for storage.
UNPROCESSABLE = "unprocessable"


class KafkaRecord(Protocol):
    """The parts of an aiokafka ConsumerRecord the writer reads."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int | None: ...


@dataclass(frozen=True)
class BatchOutcome:
    consumed: int
    stored: int
    duplicates: int
    dead_lettered: int


def split_batch(
    records: Sequence[KafkaRecord],
    settings: Settings,
    known_types: Collection[str] = SEEDED_TYPES,
) -> tuple[list[IncomingEvent], list[DeadLetter]]:
    """Validate each record; return the valid events and the dead letters, in input order.
    `known_types` are the types an active meter reads (others are `unknown_type`).

    Never raises for a record: whatever fails for one event (a rule of contract section 1,
    or any error preparing its row, which would be a gap in validation) makes that event
    alone a dead letter with its reason, so no input can stop the consumer.
    """
    now = utc_now()
    valid: list[IncomingEvent] = []
    invalid: list[DeadLetter] = []
    judged_at: dict[int | None, datetime] = {}  # records of a batch share their milliseconds
    for record in records:
        try:
            moment = judged_at.get(record.timestamp)
            if moment is None:
                moment = judged_at[record.timestamp] = accepted_at(record.timestamp, now)
            event = parse_event(
                record.value,
                now=moment,
                lateness_window=settings.lateness_window,
                future_tolerance=settings.future_tolerance,
                known_types=known_types,
            )
            valid.append(IncomingEvent(event, record.partition, record.offset))
        except InvalidEvent as error:
            invalid.append(_dead_letter(record, error.code, error.reason))
        except Exception as error:
            log.exception(
                "could not prepare the event at %s[%d]@%d",
                record.topic,
                record.partition,
                record.offset,
            )
            invalid.append(
                _dead_letter(
                    record,
                    UNPROCESSABLE,
                    f"metering could not process this event ({type(error).__name__}: "
                    f"{str(error)[:300]}); please report it, and replay it from the "
                    "dead-letter topic once fixed",
                )
            )
    return valid, invalid


def _dead_letter(record: KafkaRecord, code: str, reason: str) -> DeadLetter:
    return DeadLetter(
        record.value, record.key, code, reason, record.topic, record.partition, record.offset
    )


class BatchWriter:
    """Processes consumed batches in the documented order (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        dead_letters: DeadLetterPublisher,
        metrics: ConsumerMetrics,
        kafka_errors: tuple[type[BaseException], ...],
        accepted_types: AcceptedTypes | None = None,
    ) -> None:
        """`accepted_types` follows the meters (None: the seeded types only)."""
        self._settings = settings
        self._accepted = accepted_types
        self._store = store
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._kafka_errors = kafka_errors
        self.dead_letter_log = DeadLetterLog()

    async def process(self, records: Sequence[KafkaRecord]) -> BatchOutcome:
        """Store and dead-letter the batch; return only when both are durable.

        While Postgres or Kafka is unavailable this waits and retries (logged, counted in
        `metering_dependency_retries_total`); it never returns with work undone, so the
        caller never commits offsets past an event that was not stored or dead-lettered.
        """
        self._metrics.messages.inc(len(records))
        self._metrics.batch_size.observe(len(records))
        invalid: list[DeadLetter] = []

        def validated_chunks() -> Iterator[list[IncomingEvent]]:
            # Validation runs while Postgres writes the previous chunk (see write_chunks).
            invalid.clear()
            for start in range(0, len(records), VALIDATION_CHUNK):
                valid, bad = split_batch(
                    records[start : start + VALIDATION_CHUNK], self._settings, self._known_types()
                )
                invalid.extend(bad)
                yield valid

        started = time.perf_counter()
        try:
            result: WriteResult = await self._retry_db(
                lambda: self._store.write_chunks(validated_chunks())
            )
        except REFUSED_BY_DATABASE as error:
            result, invalid = await self._write_setting_refused_aside(records, error)
        self._metrics.write_seconds.observe(time.perf_counter() - started)
        self._metrics.stored.inc(result.stored)
        self._metrics.duplicates.inc(result.duplicates)

        if invalid:
            await retry_until_done(
                lambda: self._dead_letters.publish(invalid),
                dependency="kafka",
                transient=self._kafka_errors,
                metrics=self._metrics.dependencies,
                min_delay=self._settings.retry_min_seconds,
                max_delay=self._settings.retry_max_seconds,
            )
            for code, count in Counter(letter.code for letter in invalid).items():
                self._metrics.dead_lettered.labels(code).inc(count)
            self.dead_letter_log.record(invalid)
        return BatchOutcome(len(records), result.stored, result.duplicates, len(invalid))

    async def _write_setting_refused_aside(
        self, records: Sequence[KafkaRecord], error: BaseException
    ) -> tuple[WriteResult, list[DeadLetter]]:
        """The database refused the batch for the data of some event that validation let
        through (a gap in `parse_event`: worth a bug report). Store every other event and
        return the refused ones as dead letters (code `refused_by_database`), so that one
        bad event neither blocks its partition nor costs the good events around it."""
        log.error(
            "PostgreSQL refused a batch of %d messages (%s: %s); writing it again with the "
            "refused events set aside",
            len(records),
            type(error).__name__,
            error,
        )
        valid, invalid = split_batch(records, self._settings, self._known_types())
        result, refused = await self._retry_db(lambda: self._store.write_isolating(valid))
        by_position: dict[tuple[int | None, int | None], KafkaRecord] = {
            (record.partition, record.offset): record for record in records
        }
        for event in refused:
            record = by_position[(event.item.partition, event.item.offset)]
            invalid.append(
                _dead_letter(
                    record,
                    "refused_by_database",
                    f"PostgreSQL refused the event ({event.sqlstate}): {event.message}",
                )
            )
        return result, invalid

    def _known_types(self) -> frozenset[str]:
        return SEEDED_TYPES if self._accepted is None else self._accepted.current

    async def _retry_db(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry_postgres(
            operation, settings=self._settings, metrics=self._metrics.dependencies
        )
