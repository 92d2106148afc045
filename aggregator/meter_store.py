"""The meter pass: the meters that are not builtin, counted on a watermark of their own.

Same promise as the v1 pass (aggregator.store.AggregateStore.run_pass), on
`aggregator_state` 'meters': a pass is one REPEATABLE READ transaction that counts the
events of the transactions finished since the last one (SQL `meter_pass`), records the
crossings of the limits those meters count and moves the watermark; killed half way,
nothing of it stays. Apart from the v1 pass so that a meter a user defines (thirteen
dimensional ones can cost more than the v1 pass itself) never delays the seeded meters'
numbers, the access check or their crossings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from aggregator.limits import Crossing
from aggregator.store import FINISH_CROSSINGS, crossing_columns, limit_usages

# Bounded like the v1 pass: about $1 events a pass, in whole transactions and at least the
# first one (however large), so that catching up after an outage is a series of passes
# that each commit. Any bound at or below the snapshot's xmin is exact.
SNAPSHOT_AND_LOCK = """
WITH state AS MATERIALIZED (
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, watermark_xid
    FROM aggregator_state WHERE name = 'meters' FOR UPDATE
)
SELECT s.watermark_xid AS lower, s.xmin AS snapshot_xmin,
       least(s.xmin, greatest(
           coalesce((SELECT e.ingest_xid FROM usage_events e
                     WHERE e.ingest_xid >= s.watermark_xid
                     ORDER BY e.ingest_xid OFFSET $1 LIMIT 1), s.xmin),
           (SELECT min(e.ingest_xid) + 1 FROM usage_events e
            WHERE e.ingest_xid >= s.watermark_xid))) AS upper
FROM state s
"""
METER_PASS = "SELECT * FROM meter_pass($1, $2)"
# Marks this transaction as meter work, which the v1 pass's bound leaves out (its
# SNAPSHOT_AND_LOCK in aggregator/store.py): meter work never writes usage_events.
MARK_METER_WORK = "SET LOCAL application_name = 'metering-meter-work'"
MOVE_WATERMARK = """
UPDATE aggregator_state SET watermark_xid = $1, updated_at = now() WHERE name = 'meters'
"""
METER_SKIPS = "SELECT meter_key, reason, events FROM meter_skips"
WATERMARK_LAG = """
SELECT coalesce(extract(epoch FROM now() - min(e.received_at)), 0)::float8
FROM usage_events e, aggregator_state s
WHERE s.name = 'meters' AND e.ingest_xid >= s.watermark_xid
"""
MAX_PASS_EVENTS = 100_000


@dataclass(frozen=True)
class MeterPassResult:
    from_xid: int
    to_xid: int
    pairs: int  # (event, meter) pairs read
    new_crossings: list[Crossing]


class MeterPassStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def run_pass(self, decide: Any, max_events: int = MAX_PASS_EVENTS) -> MeterPassResult:
        """One meter pass (see the module docstring); `decide(usages)` returns the crossings
        of the touched limits that reach a threshold and are not fully notified."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            await conn.execute(MARK_METER_WORK)  # before the snapshot and the first xid
            bounds = await conn.fetchrow(SNAPSHOT_AND_LOCK, max_events)
            assert bounds is not None  # migration 016 inserts the 'meters' row
            lower: int = bounds["lower"]
            upper: int = bounds["upper"]
            if upper <= lower:
                return MeterPassResult(lower, lower, 0, [])
            applied = await conn.fetchrow(METER_PASS, lower, upper)
            assert applied is not None
            usages = limit_usages(applied)
            candidates: list[Crossing] = decide(usages)
            new_ids = {
                row["id"]
                for row in await conn.fetch(FINISH_CROSSINGS, *crossing_columns(candidates))
            }
            await conn.execute(MOVE_WATERMARK, upper)
            crossed = [c for c in candidates if c.id in new_ids]
            return MeterPassResult(lower, upper, applied["pairs"], crossed)

    async def skips(self) -> dict[tuple[str, str], int]:
        """Events each meter skipped so far, by reason (cumulative, from meter_skips)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(METER_SKIPS)
        return {(r["meter_key"], r["reason"]): r["events"] for r in rows}

    async def watermark_lag_seconds(self) -> float:
        """Age of the oldest stored event the meter passes have not counted yet."""
        async with self._pool.acquire() as conn:
            lag: float = await conn.fetchval(WATERMARK_LAG)
            return lag
