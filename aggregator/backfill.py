"""A new meter counts the past: backfilling it from the stored events of its type.

The line between the backfill and the incremental pass is `meters.counted_from_xid`: the
first pass that sees a meter sets it to its own lower bound (the watermark) and counts every
event from there on; every event below it was written by a transaction that had finished
when that pass began (the watermark is a snapshot's xmin), so the set the backfill counts
is fixed and no event is in both or in neither. The backfill walks that set in
`(org_id, occurred_at)` order, the order of the index every partition has, a chunk per
transaction: a chunk ends at the key of the `chunk_events`-th event of the set after the
last position (all events on that key included, so equal keys are never split), its events are
counted (count_meter_events, the same commutative merge as the pass) and the position moves
(`backfill_after_org`, `backfill_after_at`) in that same transaction: killed half way, it
resumes after the last chunk that committed, never counting one twice. Each chunk reads only
its own index range, so a backfill costs about one pass over the type's events whatever the
chunk size. Chunks run under the meter pass's lock, between meter passes, sized to take about
`TARGET_CHUNK_SECONDS`, so meter passes wait at most about that long. When no
event is left the meter becomes `active` and a `meter.backfilled` notification is recorded
for the webhooks, in that same transaction.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import asyncpg

from aggregator.meter_store import MARK_METER_WORK

log = logging.getLogger("metering.aggregator")
TARGET_CHUNK_SECONDS = 0.25
FIRST_CHUNK_EVENTS = 20_000
MIN_CHUNK_EVENTS = 1_000
MAX_CHUNK_EVENTS = 2_000_000
NOTIFICATION_NAMESPACE = uuid.UUID("0b7c6f0e-8f57-4a55-9a53-5d6a3c1f2e44")

NEXT_BACKFILL = """
SELECT key FROM meters
WHERE status = 'backfilling' AND counted_from_xid IS NOT NULL
ORDER BY created_at, key LIMIT 1
"""
# The meter passes' lock, and their watermark: the cancellations below it were recounted by
# a pass (for the part of the backfill done then), so a chunk leaves those events out; one
# at or above it will be recounted by a later pass, with this chunk counted by then.
LOCK_AGGREGATION = "SELECT watermark_xid FROM aggregator_state WHERE name = 'meters' FOR UPDATE"
FORCE_CUSTOM_PLAN = "SET LOCAL plan_cache_mode = force_custom_plan"
SORT_OFF = "SET LOCAL enable_sort = off"
SORT_ON = "SET LOCAL enable_sort = on"
LOCK_METER = """
SELECT key, event_type, status, counted_from_xid, backfill_total, backfill_after_org,
       backfill_after_at
FROM meters WHERE key = $1 FOR UPDATE
"""
TOTAL = "SELECT count(*) FROM usage_events WHERE event_type = $1 AND ingest_xid < $2"
SET_TOTAL = "UPDATE meters SET backfill_total = $2 WHERE key = $1"
# The key of the $3-th event of type $4 below $5 after the position ($1, $2) (NULL: from
# the start), read along the (org_id, occurred_at) index
CHUNK_END = """
SELECT c.org_id, c.occurred_at,
       (SELECT count(*) FROM usage_events t
        WHERE t.org_id = c.org_id AND t.occurred_at = c.occurred_at
          AND t.event_type = $4 AND t.ingest_xid < $5) AS tied
FROM (SELECT org_id, occurred_at FROM usage_events
      WHERE ($1::uuid IS NULL OR (org_id, occurred_at) > ($1::uuid, $2::timestamptz))
        AND event_type = $4 AND ingest_xid < $5
      ORDER BY org_id, occurred_at OFFSET $3 - 1 LIMIT 1) c
"""
COUNT_CHUNK = """
SELECT count_meter_events(ARRAY[$1]::text[], 0, $2, NULL, NULL, NULL, '{day,month}',
                          $3, $4, $5, $6, $7)
"""
READ_IN_CHUNK = """
SELECT count(*) FROM usage_events
WHERE event_type = $1 AND ingest_xid < $2
  AND ($3::uuid IS NULL OR (org_id, occurred_at) > ($3::uuid, $4::timestamptz))
  AND ($5::uuid IS NULL OR (org_id, occurred_at) <= ($5::uuid, $6::timestamptz))
"""
MOVE_ON = """
UPDATE meters SET backfill_after_org = $2, backfill_after_at = $3,
                  backfill_read = backfill_read + $4
WHERE key = $1
"""
FINISH = """
WITH done AS (
    UPDATE meters SET status = 'active', backfilled_at = now(),
                      backfill_read = coalesce(backfill_total, backfill_read)
    WHERE key = $1 AND status = 'backfilling'
    RETURNING key, backfill_read, backfilled_at
)
INSERT INTO meter_notifications (id, kind, meter_key, payload)
SELECT $2, 'meter.backfilled', key,
       jsonb_build_object('meter', key, 'events', backfill_read,
                          'backfilled_at', backfilled_at)
FROM done
ON CONFLICT (id) DO NOTHING
"""


@dataclass(frozen=True)
class BackfillStep:
    meter: str
    events: int
    finished: bool


class Backfiller:
    """Backfills one chunk at a time; `step` is called by the aggregator between passes."""

    def __init__(self, pool: asyncpg.Pool, chunk_events: int | None = None) -> None:
        """`chunk_events` fixes the chunk size (tests); by default it adapts."""
        self._pool = pool
        self._chunk = chunk_events or FIRST_CHUNK_EVENTS
        self._fixed = chunk_events is not None

    async def step(self) -> BackfillStep | None:
        """Backfill the next chunk of the oldest backfilling meter; None when none waits
        (a meter waits for the first pass that sees it before its backfill can start)."""
        async with self._pool.acquire() as conn:
            key = await conn.fetchval(NEXT_BACKFILL)
            if key is None:
                return None
            started = time.perf_counter()
            async with conn.transaction():
                # `$1 IS NULL OR (org_id, occurred_at) > ...` must be planned for its values
                # (a generic plan would sort the whole table for each chunk)
                await conn.execute(FORCE_CUSTOM_PLAN)
                await conn.execute(MARK_METER_WORK)  # see aggregator/meter_store.py
                watermark: int = await conn.fetchval(LOCK_AGGREGATION)
                meter = await conn.fetchrow(LOCK_METER, key)
                if meter is None or meter["status"] != "backfilling":
                    return None
                below: int = meter["counted_from_xid"]
                if meter["backfill_total"] is None:
                    total = await conn.fetchval(TOTAL, meter["event_type"], below)
                    await conn.execute(SET_TOTAL, key, total)
                    log.info("meter %s: backfilling %d stored events of its type", key, total)
                after = (meter["backfill_after_org"], meter["backfill_after_at"])
                # along the index: the row comparison's estimate (one row) would otherwise
                # make the planner sort every event after the position for each chunk
                await conn.execute(SORT_OFF)
                end = await conn.fetchrow(
                    CHUNK_END, *after, self._chunk, meter["event_type"], below
                )
                await conn.execute(SORT_ON)
                upto = (end["org_id"], end["occurred_at"]) if end is not None else (None, None)
                await conn.fetchval(COUNT_CHUNK, key, below, *after, *upto, watermark)
                finished = end is None
                # a chunk that ends at its N-th event read N events, or more on a tie of
                # its last key; only then (and for the last chunk) count them
                read: int = self._chunk
                if end is None or end["tied"] > 1:
                    read = await conn.fetchval(
                        READ_IN_CHUNK, meter["event_type"], below, *after, *upto
                    )
                if finished:
                    await self._finish(conn, key)
                else:
                    await conn.execute(MOVE_ON, key, *upto, read)
            self._adapt(time.perf_counter() - started)
        if finished:
            log.info("meter %s: backfill complete; active", key)
        return BackfillStep(key, read, finished)

    async def _finish(self, conn: asyncpg.pool.PoolConnectionProxy, key: str) -> None:
        notification = uuid.uuid5(NOTIFICATION_NAMESPACE, f"meter.backfilled|{key}")
        await conn.execute(FINISH, key, notification)

    def _adapt(self, seconds: float) -> None:
        """Size the next chunk so that it takes about TARGET_CHUNK_SECONDS."""
        if self._fixed:
            return
        factor = min(2.0, max(0.5, TARGET_CHUNK_SECONDS / max(seconds, 1e-3)))
        self._chunk = int(min(MAX_CHUNK_EVENTS, max(MIN_CHUNK_EVENTS, self._chunk * factor)))
