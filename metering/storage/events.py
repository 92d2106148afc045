"""Writing usage events: set-based, deduplicated by a constraint, in one transaction."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from uuid import UUID

import asyncpg

from metering.event_json import dump_json
from metering.models import UsageEvent
from metering.storage.pool import PERMANENT_DB_ERRORS

# One statement: claim the ids no one stored yet, store exactly those events. The claim and
# the store commit together or not at all, so an id is never marked seen without its
# event (the failure of openmeter#5118). Rows are claimed in key order so two writers
# that briefly share a partition during a rebalance cannot deadlock on each other.
STORE_NEW_EVENTS = """
WITH incoming AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[],
                $6::timestamptz[], $7::text[], $8::int[], $9::bigint[])
         AS t(org_id, event_id, event_type, user_id, quantity, occurred_at, metadata,
              source_partition, source_offset)
), claimed AS (
    INSERT INTO usage_event_ids (org_id, event_id)
    SELECT org_id, event_id FROM incoming ORDER BY org_id, event_id
    ON CONFLICT DO NOTHING
    RETURNING org_id, event_id
), stored AS (
    INSERT INTO usage_events (org_id, event_id, event_type, user_id, quantity, occurred_at,
                              metadata, source_partition, source_offset)
    SELECT i.org_id, i.event_id, i.event_type, i.user_id, i.quantity::numeric, i.occurred_at,
           i.metadata::jsonb, i.source_partition, i.source_offset
    FROM incoming i JOIN claimed c USING (org_id, event_id)
    RETURNING 1
)
SELECT count(*) FROM stored
"""

# An organization first seen in an event gets the free plan (contract section 4).
ENSURE_SUBSCRIPTIONS = """
INSERT INTO org_subscriptions (org_id)
SELECT org_id FROM unnest($1::uuid[]) AS t(org_id) ORDER BY org_id
ON CONFLICT (org_id) DO NOTHING
"""

# How many events this transaction stored, and when: the aggregator's freshness histogram
# reads it (migration 008).
RECORD_BATCH = "INSERT INTO ingest_batches (events) VALUES ($1)"

ENSURE_PARTITIONS = "SELECT ensure_usage_event_partitions($1::date, $2::date)"
# The writer's only way to make partitions: two months back to two ahead of the database's
# today (migration 014); a range of its choosing is the owner's.
ENSURE_PARTITIONS_AROUND_TODAY = "SELECT ensure_usage_event_partitions_around_today()"

# Errors that say "this row's data" rather than "this database": a value PostgreSQL cannot
# convert or a CHECK it breaks. Validation should have refused such an event already; if
# one slips through, `write_isolating` finds it so that it alone is set aside.
# Classes, not single errors: any data exception (SQLSTATE class 22), any integrity
# violation (class 23: CHECK, NOT NULL, a row no partition takes), a row beyond a program
# limit (class 54), and asyncpg's own refusal to encode an argument.
REFUSED_BY_DATABASE: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    *PERMANENT_DB_ERRORS,  # asyncpg refusing to encode an argument
)


@dataclass(frozen=True)
class IncomingEvent:
    """A validated event and where it came from (kept on the row for audits).

    Its metadata's JSON text is made here, once, so that anything about one event that
    cannot be written fails while that event is still on its own (the consumer dead-letters
    it) and never inside a batch's statement.
    """

    event: UsageEvent
    partition: int | None = None
    offset: int | None = None
    metadata_json: str | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        metadata = self.event.metadata
        object.__setattr__(self, "metadata_json", None if metadata is None else dump_json(metadata))


@dataclass(frozen=True)
class WriteResult:
    stored: int
    duplicates: int


@dataclass(frozen=True)
class RefusedEvent:
    """An event PostgreSQL would not store, with the error it gave."""

    item: IncomingEvent
    sqlstate: str
    message: str


class EventStore:
    """Writes batches of events to `usage_events`, each (org_id, id) exactly once."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._known_orgs: set[UUID] = set()

    async def ensure_partitions(self, first_month: date, last_month: date) -> int:
        """Create the monthly partitions between the two months; return how many were new.
        Needs the owner's privileges (the writer role uses `ensure_partitions_around_today`)."""
        async with self._pool.acquire() as conn:
            created: int = await conn.fetchval(ENSURE_PARTITIONS, first_month, last_month)
            return created

    async def ensure_partitions_around_today(self) -> int:
        """Create the partitions from two months before the database's today to two months
        after; return how many were new. Allowed to the writer role."""
        async with self._pool.acquire() as conn:
            created: int = await conn.fetchval(ENSURE_PARTITIONS_AROUND_TODAY)
            return created

    async def write_batch(self, batch: Sequence[IncomingEvent]) -> WriteResult:
        """Store every event of `batch` whose (org_id, id) was never stored, in one transaction.

        Returns how many were stored and how many were duplicates (of each other or of an
        earlier batch). Either all of the batch's new events are stored or, on an error,
        none are: the caller retries the whole batch and duplicates make that harmless.
        """
        return await self.write_chunks([batch])

    async def write_chunks(self, chunks: Iterable[Sequence[IncomingEvent]]) -> WriteResult:
        """Like `write_batch` for a batch given in chunks, all in ONE transaction.

        The statement for chunk k runs in Postgres while the caller's iterator produces
        chunk k+1 (e.g. validates it), so Python and Postgres work at the same time on two
        cores. A later chunk sees the ids an earlier one claimed, so duplicates across
        chunks are caught by the same constraint.
        """
        total = stored = 0
        orgs: set[UUID] = set()
        async with self._pool.acquire() as conn, conn.transaction():
            pending: asyncio.Task[int] | None = None
            try:
                for chunk in chunks:
                    total += len(chunk)
                    columns, chunk_orgs = _columns(chunk)
                    orgs |= chunk_orgs
                    if pending is not None:
                        stored += await pending
                        pending = None
                    if columns[0]:
                        pending = asyncio.create_task(conn.fetchval(STORE_NEW_EVENTS, *columns))
                        # let the task send the statement before the iterator takes the CPU
                        await asyncio.sleep(0)
                if pending is not None:
                    stored += await pending
                    pending = None
            finally:
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await pending
            new_orgs = await self._record(conn, stored, orgs)
        self._known_orgs.update(new_orgs)  # only once their subscriptions are committed
        return WriteResult(stored=stored, duplicates=total - stored)

    async def write_isolating(
        self, batch: Sequence[IncomingEvent]
    ) -> tuple[WriteResult, list[RefusedEvent]]:
        """Like `write_batch`, for a batch the database refused as a whole: store every event
        it accepts, in ONE transaction, and return the ones it refuses (REFUSED_BY_DATABASE)
        instead of failing with them. A refused chunk is halved under a savepoint until the
        refused events stand alone, so a batch with k bad events costs O(k log n) statements.
        Earlier events are written first, so the first copy of a duplicate is the one kept.
        `duplicates` in the result excludes the refused events.
        """
        stored = 0
        refused: list[RefusedEvent] = []
        orgs: set[UUID] = set()
        async with self._pool.acquire() as conn, conn.transaction():
            pending: list[Sequence[IncomingEvent]] = [batch]
            while pending:
                chunk = pending.pop()
                columns, chunk_orgs = _columns(chunk)
                if not columns[0]:
                    continue
                try:
                    async with conn.transaction():  # a savepoint
                        stored += await conn.fetchval(STORE_NEW_EVENTS, *columns)
                except REFUSED_BY_DATABASE as error:
                    if len(chunk) == 1:
                        state = getattr(error, "sqlstate", None) or "asyncpg"
                        refused.append(RefusedEvent(chunk[0], state, str(error)))
                    else:
                        middle = len(chunk) // 2
                        pending += [chunk[middle:], chunk[:middle]]  # first half next
                    continue
                orgs |= chunk_orgs
            new_orgs = await self._record(conn, stored, orgs)
        self._known_orgs.update(new_orgs)
        return WriteResult(stored, len(batch) - stored - len(refused)), refused

    async def _record(
        self, conn: asyncpg.pool.PoolConnectionProxy, stored: int, orgs: set[UUID]
    ) -> list[UUID]:
        """In the writing transaction: its ingest_batches row, and the free plan for the
        organizations not known to have a subscription. Returns those organizations; the
        caller remembers them only after the transaction commits (a rollback undoes their
        subscriptions)."""
        if stored:
            await conn.execute(RECORD_BATCH, stored)
        new_orgs = sorted(orgs - self._known_orgs)
        if new_orgs:
            await conn.execute(ENSURE_SUBSCRIPTIONS, new_orgs)
        return new_orgs


def _columns(chunk: Sequence[IncomingEvent]) -> tuple[tuple[list[object], ...], set[UUID]]:
    """The statement's column arrays for the first copy of each (org_id, id) in `chunk`."""
    first_copy: dict[tuple[UUID, str], IncomingEvent] = {}
    for item in chunk:
        first_copy.setdefault((item.event.org_id, item.event.id), item)
    columns: tuple[list[object], ...] = ([], [], [], [], [], [], [], [], [])
    for item in first_copy.values():
        event = item.event
        columns[0].append(event.org_id)
        columns[1].append(event.id)
        columns[2].append(str(event.type))
        columns[3].append(event.user_id)
        columns[4].append(str(event.quantity))  # as text: 3x cheaper to send than numeric
        columns[5].append(event.occurred_at)
        columns[6].append(item.metadata_json)
        columns[7].append(item.partition)
        columns[8].append(item.offset)
    return columns, {org for org, _ in first_copy}
