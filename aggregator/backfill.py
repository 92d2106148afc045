"""A new meter counts the past: backfilling it from the stored events of its type.

The line between the backfill and the incremental pass is `meters.counted_from_xid`: the
first pass that sees a meter sets it to its own lower bound (the watermark) and counts every
event from there on; every event below it was written by a transaction that had finished
when that pass began (the watermark is a snapshot's xmin), so the set the backfill counts
is fixed and no event is in both or in neither. The backfill walks that set by
`occurred_at`, a chunk per transaction, each adding its events (count_meter_events, the same
commutative merge as the pass) and moving `backfill_done_until` in the same transaction:
killed half way, it resumes after the last chunk that committed, never counting a chunk
twice. Chunks run under the aggregator's lock, between passes, sized to take about
`TARGET_CHUNK_SECONDS`, so passes (and freshness) wait at most about that long. When the
last chunk commits the meter becomes `active` and a `meter.backfilled` notification is
recorded for the webhooks, in that same transaction.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

log = logging.getLogger("metering.aggregator")
TARGET_CHUNK_SECONDS = 0.25
FIRST_CHUNK = timedelta(hours=6)
MIN_CHUNK = timedelta(minutes=1)
MAX_CHUNK = timedelta(days=31)
NOTIFICATION_NAMESPACE = uuid.UUID("0b7c6f0e-8f57-4a55-9a53-5d6a3c1f2e44")

NEXT_BACKFILL = """
SELECT key FROM meters
WHERE status = 'backfilling' AND counted_from_xid IS NOT NULL
ORDER BY created_at, key LIMIT 1
"""
LOCK_AGGREGATION = "SELECT 1 FROM aggregator_state WHERE name = 'usage' FOR UPDATE"
LOCK_METER = """
SELECT key, status, counted_from_xid, backfill_from, backfill_done_until, backfill_until,
       backfill_events
FROM meters WHERE key = $1 FOR UPDATE
"""
EXTENT = """
SELECT min(occurred_at) AS first, max(occurred_at) AS last, count(*) AS events
FROM usage_events WHERE event_type = $1 AND ingest_xid < $2
"""
SET_EXTENT = """
UPDATE meters SET backfill_from = $2, backfill_done_until = $2, backfill_until = $3
WHERE key = $1
"""
COUNT_CHUNK = "SELECT count_meter_events(ARRAY[$1]::text[], 0, $2, $3, $4)"
MOVE_ON = """
UPDATE meters SET backfill_done_until = $2, backfill_events = backfill_events + $3
WHERE key = $1
"""
FINISH = """
WITH done AS (
    UPDATE meters SET status = 'active', backfilled_at = now()
    WHERE key = $1 AND status = 'backfilling'
    RETURNING key, backfill_events, backfilled_at
)
INSERT INTO meter_notifications (id, kind, meter_key, payload)
SELECT $2, 'meter.backfilled', key,
       jsonb_build_object('meter', key, 'events', backfill_events,
                          'backfilled_at', backfilled_at)
FROM done
ON CONFLICT (id) DO NOTHING
"""
EVENT_TYPE = "SELECT event_type FROM meters WHERE key = $1"


@dataclass(frozen=True)
class BackfillStep:
    meter: str
    events: int
    finished: bool


class Backfiller:
    """Backfills one chunk at a time; `step` is called by the aggregator between passes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._chunk = FIRST_CHUNK

    async def step(self) -> BackfillStep | None:
        """Backfill the next chunk of the oldest backfilling meter; None when none waits
        (a meter waits for the first pass that sees it before its backfill can start)."""
        async with self._pool.acquire() as conn:
            key = await conn.fetchval(NEXT_BACKFILL)
            if key is None:
                return None
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(LOCK_AGGREGATION)
                meter = await conn.fetchrow(LOCK_METER, key)
                if meter is None or meter["status"] != "backfilling":
                    return None
                below: int = meter["counted_from_xid"]
                if meter["backfill_until"] is None:
                    event_type = await conn.fetchval(EVENT_TYPE, key)
                    extent = await conn.fetchrow(EXTENT, event_type, below)
                    assert extent is not None
                    if extent["first"] is None:
                        await self._finish(conn, key)
                        log.info("meter %s: no stored events to backfill; active", key)
                        return BackfillStep(key, 0, True)
                    until = extent["last"] + timedelta(microseconds=1)
                    await conn.execute(SET_EXTENT, key, extent["first"], until)
                    log.info(
                        "meter %s: backfilling %d stored events from %s to %s",
                        key,
                        extent["events"],
                        extent["first"].isoformat(),
                        extent["last"].isoformat(),
                    )
                    start, end = extent["first"], until
                else:
                    start, end = meter["backfill_done_until"], meter["backfill_until"]
                chunk_end = min(start + self._chunk, end)
                counted: int = await conn.fetchval(COUNT_CHUNK, key, below, start, chunk_end)
                await conn.execute(MOVE_ON, key, chunk_end, counted)
                finished = chunk_end >= end
                if finished:
                    await self._finish(conn, key)
            self._adapt(time.perf_counter() - started)
        if finished:
            log.info("meter %s: backfill complete; active", key)
        return BackfillStep(key, counted, finished)

    async def _finish(self, conn: asyncpg.pool.PoolConnectionProxy, key: str) -> None:
        notification = uuid.uuid5(NOTIFICATION_NAMESPACE, f"meter.backfilled|{key}")
        await conn.execute(FINISH, key, notification)

    def _adapt(self, seconds: float) -> None:
        """Size the next chunk so that it takes about TARGET_CHUNK_SECONDS."""
        factor = min(2.0, max(0.5, TARGET_CHUNK_SECONDS / max(seconds, 1e-3)))
        self._chunk = min(MAX_CHUNK, max(MIN_CHUNK, self._chunk * factor))
