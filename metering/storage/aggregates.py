"""Storage for the aggregator: one incremental pass, the outbox of crossings, reads."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from aggregator.limits import THRESHOLDS, Crossing, LimitUsage

SNAPSHOT_XMIN = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
LOCK_WATERMARK = "SELECT watermark_xid FROM aggregator_state WHERE name = 'usage' FOR UPDATE"
AGGREGATE_NEW_EVENTS = "SELECT * FROM aggregate_new_events($1, $2)"
MOVE_WATERMARK = (
    "UPDATE aggregator_state SET watermark_xid = $1, updated_at = now() WHERE name = 'usage'"
)
RECORD_PASS = """
INSERT INTO aggregation_passes (from_xid, to_xid, events, finished_at)
VALUES ($1, $2, $3, clock_timestamp())
"""
# Usage of every limited feature in the months the new events touched, with the thresholds
# already recorded for it; limits with every threshold recorded are left out (migration 009).
TOUCHED_LIMITS = "SELECT * FROM touched_limit_usage($1, $2, $3, $4)"
RECORD_CROSSINGS = """
INSERT INTO limit_notifications
    (id, org_id, feature_key, period, period_start, threshold_percent, used, limit_value,
     crossed_at)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::date[], $6::int[],
                     $7::numeric[], $8::bigint[], $9::timestamptz[])
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
UNPUBLISHED = """
SELECT id, org_id, feature_key, period, period_start, threshold_percent, used, limit_value,
       crossed_at
FROM limit_notifications WHERE published_at IS NULL ORDER BY crossed_at LIMIT $1
"""
MARK_PUBLISHED = "UPDATE limit_notifications SET published_at = now() WHERE id = ANY($1::uuid[])"
WATERMARK_LAG = """
SELECT coalesce(extract(epoch FROM now() - min(e.received_at)), 0)::float8
FROM usage_events e, aggregator_state s
WHERE s.name = 'usage' AND e.ingest_xid >= s.watermark_xid
"""
REAGGREGATE = "SELECT aggregate_usage($1, $2, $3, $4)"
CHECK_ACCESS = "SELECT check_feature_access($1, $2, $3, $4)"


@dataclass(frozen=True)
class PassResult:
    from_xid: int
    to_xid: int
    events: int
    ages: list[tuple[float, int]]  # (seconds from storage to this pass, events that old)
    new_crossings: list[Crossing]


class AggregateStore:
    """The aggregator's SQL, behind small methods."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def run_pass(self, decide: Any) -> PassResult:
        """One incremental pass, in one REPEATABLE READ transaction: aggregate the events of
        every transaction finished since the last pass, record the threshold crossings
        `decide(usages)` returns, and move the watermark. Killed half way, nothing of it
        stays and the next pass does the same work: no event is ever counted twice.
        """
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            upper: int = await conn.fetchval(SNAPSHOT_XMIN)
            lower: int = await conn.fetchval(LOCK_WATERMARK)
            if upper <= lower:
                return PassResult(lower, lower, 0, [], [])
            applied = await conn.fetchrow(AGGREGATE_NEW_EVENTS, lower, upper)
            assert applied is not None  # a function with OUT parameters returns one row
            events: int = applied["events"]
            measured_at: datetime = applied["measured_at"]
            stored = zip(applied["received_at"], applied["received_events"], strict=True)
            ages = [((measured_at - at).total_seconds(), count) for at, count in stored]
            crossed: list[Crossing] = []
            if events:
                rows = await conn.fetch(
                    TOUCHED_LIMITS,
                    applied["touched_orgs"],
                    applied["touched_types"],
                    applied["touched_months"],
                    list(THRESHOLDS),
                )
                usages = [
                    LimitUsage(
                        r["org_id"],
                        r["feature_key"],
                        r["period"],
                        r["period_start"],
                        Decimal(r["used"]),
                        r["limit_value"],
                        frozenset(r["notified"]),
                    )
                    for r in rows
                ]
                candidates: list[Crossing] = decide(usages)
                if candidates:
                    new_ids = {
                        row["id"]
                        for row in await conn.fetch(
                            RECORD_CROSSINGS, *_crossing_columns(candidates)
                        )
                    }
                    crossed = [c for c in candidates if c.id in new_ids]
            await conn.execute(MOVE_WATERMARK, upper)
            if events:
                await conn.execute(RECORD_PASS, lower, upper, events)
            return PassResult(lower, upper, events, ages, crossed)

    async def unpublished(self, limit: int = 500) -> list[Crossing]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(UNPUBLISHED, limit)
        return [
            Crossing(
                r["id"],
                r["org_id"],
                r["feature_key"],
                r["period"],
                r["period_start"],
                r["threshold_percent"],
                Decimal(r["used"]),
                r["limit_value"],
                r["crossed_at"],
            )
            for r in rows
        ]

    async def mark_published(self, ids: list[UUID]) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(MARK_PUBLISHED, ids)

    async def watermark_lag_seconds(self) -> float:
        async with self._pool.acquire() as conn:
            lag: float = await conn.fetchval(WATERMARK_LAG)
            return lag

    async def reaggregate(
        self, period: str, start: datetime, end: datetime, org_id: UUID | None
    ) -> int:
        """Recompute one window of one period from raw events (see aggregate_usage)."""
        async with self._pool.acquire() as conn, conn.transaction():
            written: int = await conn.fetchval(REAGGREGATE, period, start, end, org_id)
            return written

    async def check_access(
        self, org_id: UUID, feature_key: str, requested: Decimal, user_id: UUID | None = None
    ) -> dict[str, Any]:
        """`check_feature_access`; raises asyncpg.NoDataFoundError for an unknown feature."""
        import json

        async with self._pool.acquire() as conn:
            raw = await conn.fetchval(CHECK_ACCESS, user_id, feature_key, org_id, requested)
        result: dict[str, Any] = json.loads(raw)
        return result

    async def reconcile(self, start: date, end: date) -> list[asyncpg.Record]:
        """Differences between stored aggregates and a recomputation from raw events, for
        periods starting in [start, end). Empty means every number adds up."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            return list(await conn.fetch(RECONCILE, start, end))


def _crossing_columns(items: list[Crossing]) -> tuple[list[Any], ...]:
    return (
        [c.id for c in items],
        [c.org_id for c in items],
        [c.feature_key for c in items],
        [c.period for c in items],
        [c.period_start for c in items],
        [c.threshold_percent for c in items],
        [c.used for c in items],
        [c.limit for c in items],
        [c.crossed_at for c in items],
    )


# Recomputes aggregates straight from usage_events with its own query (not the
# aggregator's functions) and returns every (org, type, period, start) that differs.
# Only events below the watermark count: those are exactly what the aggregates cover.
RECONCILE = """
WITH wm AS (
    SELECT watermark_xid FROM aggregator_state WHERE name = 'usage'
), ev AS (
    SELECT e.org_id, e.event_type, t.aggregation, p.period, e.quantity, e.occurred_at,
           e.event_id, e.user_id,
           CASE p.period
               WHEN 'day' THEN (e.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))::date
               ELSE date_trunc('month',
                               e.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))::date
           END AS period_start
    FROM usage_events e
    JOIN event_types t ON t.event_type = e.event_type
    LEFT JOIN org_subscriptions s ON s.org_id = e.org_id
    CROSS JOIN (VALUES ('day'), ('month')) AS p (period)
    CROSS JOIN wm
    WHERE e.ingest_xid < wm.watermark_xid
      AND e.occurred_at >= $1::date - interval '32 days'
      AND e.occurred_at < $2::date + interval '32 days'
), expected AS (
    SELECT org_id, event_type, period, period_start, count(*) AS event_count,
           CASE min(aggregation)
               WHEN 'sum' THEN sum(quantity)
               WHEN 'distinct_users' THEN count(DISTINCT user_id)
               ELSE (array_agg(quantity ORDER BY occurred_at DESC, quantity DESC))[1]
           END AS value
    FROM ev GROUP BY org_id, event_type, period, period_start
), stored AS (
    SELECT org_id, event_type, period, period_start, value, event_count
    FROM usage_aggregations WHERE period_start >= $1 AND period_start < $2
)
SELECT org_id, event_type, period, period_start,
       x.value AS expected_value, a.value AS stored_value,
       x.event_count AS expected_events, a.event_count AS stored_events
FROM (SELECT * FROM expected WHERE period_start >= $1 AND period_start < $2) x
FULL JOIN stored a USING (org_id, event_type, period, period_start)
WHERE x.value IS DISTINCT FROM a.value OR x.event_count IS DISTINCT FROM a.event_count
ORDER BY org_id, event_type, period, period_start
"""
