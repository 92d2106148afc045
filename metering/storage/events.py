"""Writing usage events: set-based, deduplicated by a constraint, in one transaction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from uuid import UUID

import asyncpg

from metering.models import UsageEvent, json_default

# One statement: claim the ids no one stored yet, store exactly those events. The claim and
# the store commit together or not at all, so an id is never marked seen without its
# event (the failure of openmeter#5118). Rows are claimed in key order so two writers
# that briefly share a partition during a rebalance cannot deadlock on each other.
STORE_NEW_EVENTS = """
WITH incoming AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::numeric[],
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
    SELECT i.org_id, i.event_id, i.event_type, i.user_id, i.quantity, i.occurred_at,
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

ENSURE_PARTITIONS = "SELECT ensure_usage_event_partitions($1::date, $2::date)"


@dataclass(frozen=True)
class IncomingEvent:
    """A validated event and where it came from (kept on the row for audits)."""

    event: UsageEvent
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True)
class WriteResult:
    stored: int
    duplicates: int


class EventStore:
    """Writes batches of events to `usage_events`, each (org_id, id) exactly once."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._known_orgs: set[UUID] = set()

    async def ensure_partitions(self, first_month: date, last_month: date) -> int:
        """Create the monthly partitions between the two months; return how many were new."""
        async with self._pool.acquire() as conn:
            created: int = await conn.fetchval(ENSURE_PARTITIONS, first_month, last_month)
            return created

    async def write_batch(self, batch: Sequence[IncomingEvent]) -> WriteResult:
        """Store every event of `batch` whose (org_id, id) was never stored, in one transaction.

        Returns how many were stored and how many were duplicates (of each other or of an
        earlier batch). Either all of the batch's new events are stored or, on an error,
        none are: the caller retries the whole batch and duplicates make that harmless.
        """
        if not batch:
            return WriteResult(stored=0, duplicates=0)
        first_copy: dict[tuple[UUID, str], IncomingEvent] = {}
        for item in batch:
            first_copy.setdefault((item.event.org_id, item.event.id), item)
        unique = list(first_copy.values())
        columns: tuple[list[object], ...] = ([], [], [], [], [], [], [], [], [])
        for item in unique:
            event = item.event
            columns[0].append(event.org_id)
            columns[1].append(event.id)
            columns[2].append(event.type.value)
            columns[3].append(event.user_id)
            columns[4].append(event.quantity)
            columns[5].append(event.occurred_at)
            columns[6].append(
                None if event.metadata is None else json.dumps(event.metadata, default=json_default)
            )
            columns[7].append(item.partition)
            columns[8].append(item.offset)
        new_orgs = sorted({event_org for event_org, _ in first_copy} - self._known_orgs)
        async with self._pool.acquire() as conn, conn.transaction():
            stored: int = await conn.fetchval(STORE_NEW_EVENTS, *columns)
            if new_orgs:
                await conn.execute(ENSURE_SUBSCRIPTIONS, new_orgs)
        self._known_orgs.update(new_orgs)
        return WriteResult(stored=stored, duplicates=len(batch) - stored)
