"""Storage for the aggregator: one incremental pass, the outbox of crossings, reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from aggregator.limits import THRESHOLDS, Crossing, LimitUsage

# The snapshot's xmin bounds the pass: every transaction below it has finished, so no event
# below it can still appear. Taken in the transaction's first statement, with the
# aggregator's lock (one pass or recompute at a time). A pass takes the consumer's
# transactions (ingest_batches) in order while fewer than $1 events come before them (no
# limit when $1 is NULL), at least one, so that catching up after an outage is a series
# of bounded passes that each commit, not one pass over everything. Any bound at or below
# xmin keeps the promise above.
#
# One exception, so that a meter pass or backfill chunk (they run for seconds under a heavy
# meter set, and never write usage_events) does not hold the v1 passes back: the bound is
# the oldest transaction still running *other than those*, which mark themselves with the
# application_name METER_WORK (aggregator/meter_store.py, aggregator/backfill.py). Every
# transaction below it has finished or writes no event. A marked transaction that ended
# meanwhile is simply not found, and counts as running (a lower bound: safe).
SNAPSHOT_AND_LOCK = """
WITH snap AS MATERIALIZED (
    SELECT pg_current_snapshot() AS s
), meter_work AS MATERIALIZED (
    SELECT backend_xid::text::bigint AS xid FROM pg_stat_activity
    WHERE application_name = 'metering-meter-work' AND backend_xid IS NOT NULL
), state AS MATERIALIZED (
    SELECT coalesce((SELECT min(x::text::bigint) FROM snap, pg_snapshot_xip(snap.s) AS x
                     WHERE x::text::bigint % 4294967296 NOT IN (SELECT xid FROM meter_work)),
                    (SELECT pg_snapshot_xmax(s)::text::bigint FROM snap)) AS xmin,
           watermark_xid
    FROM aggregator_state WHERE name = 'usage' FOR UPDATE
)
SELECT s.watermark_xid AS lower, s.xmin AS snapshot_xmin,
       coalesce((SELECT min(b.ingest_xid)
                 FROM (SELECT ingest_xid, sum(events) OVER (ORDER BY ingest_xid) - events AS before
                       FROM ingest_batches
                       WHERE ingest_xid >= s.watermark_xid AND ingest_xid < s.xmin) b
                 WHERE b.before >= $1), s.xmin) AS upper
FROM state s
"""
# Aggregates the new events and returns the usage of every limited feature in the months
# they touched (and of the limits to check again, limit_rechecks) that reaches the lowest
# of its thresholds, with the thresholds already recorded (a bit mask over its own);
# limits with every threshold recorded are left out (migrations 009, 011, 012 and 020).
AGGREGATION_PASS = "SELECT * FROM aggregation_pass($1, $2)"
# The end of a pass, in one statement: record the crossings (ids are deterministic, so a
# crossing recorded before is not recorded again and not returned), move the watermark and
# record the pass.
FINISH_PASS = """
WITH recorded AS (
    INSERT INTO limit_notifications
        (id, org_id, feature_key, period, period_start, threshold_percent, used, limit_value,
         crossed_at)
    SELECT * FROM unnest($4::uuid[], $5::uuid[], $6::text[], $7::text[], $8::date[],
                         $9::int[], $10::numeric[], $11::bigint[], $12::timestamptz[])
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), moved AS (
    UPDATE aggregator_state SET watermark_xid = $2::bigint, updated_at = now()
    WHERE name = 'usage'
), passed AS (
    INSERT INTO aggregation_passes (from_xid, to_xid, events, finished_at)
    SELECT $1::bigint, $2::bigint, $3::bigint, clock_timestamp() WHERE $3::bigint > 0
)
SELECT id FROM recorded
"""
# The crossings alone (the meter pass, aggregator/meter_store.py): record them, once each.
FINISH_CROSSINGS = """
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
MARK_PUBLISHED = """
UPDATE limit_notifications SET published_at = now()
WHERE id = ANY($1::uuid[]) AND published_at IS NULL
"""
OLDEST_UNPUBLISHED = "SELECT min(crossed_at) FROM limit_notifications WHERE published_at IS NULL"
WATERMARK_LAG = """
SELECT coalesce(extract(epoch FROM now() - min(e.received_at)), 0)::float8
FROM usage_events e, aggregator_state s
WHERE s.name = 'usage' AND e.ingest_xid >= s.watermark_xid
"""
REAGGREGATE = "SELECT aggregate_usage($1, $2, $3, $4)"
FORCE_CUSTOM_PLAN = "SET LOCAL plan_cache_mode = force_custom_plan"
CHECK_ACCESS = "SELECT check_feature_access($1, $2, $3, $4)"


@dataclass(frozen=True)
class PassResult:
    from_xid: int
    to_xid: int
    events: int
    ages: list[tuple[float, int]]  # (seconds from storage to this pass, events that old)
    new_crossings: list[Crossing]
    caught_up: bool = True  # False: the pass stopped at its event budget, more is waiting


class AggregateStore:
    """The aggregator's SQL, behind small methods."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def run_pass(self, decide: Any, max_events: int | None = None) -> PassResult:
        """One incremental pass, in one REPEATABLE READ transaction: aggregate the events of
        the transactions finished since the last pass (with `max_events`, the consumer's
        only while fewer than that many events come before them; `caught_up` says whether
        a finished one was left for the next pass), record the threshold crossings
        `decide(usages)` returns (usages: the touched limits that reach a threshold and are
        not fully notified), and move the watermark. Killed half way, nothing of it
        stays and the next pass does the same work: no event is ever counted twice.
        """
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            bounds = await conn.fetchrow(SNAPSHOT_AND_LOCK, max_events)
            assert bounds is not None  # migration 003 inserts the 'usage' row
            lower: int = bounds["lower"]
            upper: int = bounds["upper"]
            caught_up = upper == bounds["snapshot_xmin"]
            if upper <= lower:
                return PassResult(lower, lower, 0, [], [])
            applied = await conn.fetchrow(AGGREGATION_PASS, lower, upper)
            assert applied is not None  # a function with OUT parameters returns one row
            events: int = applied["events"]
            measured_at: datetime = applied["measured_at"]
            stored = zip(applied["received_at"], applied["received_events"], strict=True)
            ages = [((measured_at - at).total_seconds(), count) for at, count in stored]
            usages = limit_usages(applied)
            candidates: list[Crossing] = decide(usages)
            new_ids = {
                row["id"]
                for row in await conn.fetch(
                    FINISH_PASS, lower, upper, events, *crossing_columns(candidates)
                )
            }
            crossed = [c for c in candidates if c.id in new_ids]
            return PassResult(lower, upper, events, ages, crossed, caught_up)

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

    async def mark_published(self, ids: list[UUID]) -> int:
        """Mark these crossings published (those not marked yet); return how many were."""
        async with self._pool.acquire() as conn:
            status: str = await conn.execute(MARK_PUBLISHED, ids)
        return int(status.rsplit(" ", 1)[1])

    async def oldest_unpublished(self) -> datetime | None:
        """When the oldest crossing not yet published was found (None: all published)."""
        async with self._pool.acquire() as conn:
            oldest: datetime | None = await conn.fetchval(OLDEST_UNPUBLISHED)
        return oldest

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
        async with self._pool.acquire() as conn:
            raw = await conn.fetchval(CHECK_ACCESS, user_id, feature_key, org_id, requested)
        result: dict[str, Any] = json.loads(raw)
        return result

    async def reconcile(
        self, start: date, end: date, org_id: UUID | None = None
    ) -> list[dict[str, Any]]:
        """Differences between stored aggregates and a recomputation from raw events, for
        periods starting in [start, end), of every organization or of `org_id`: the v1
        aggregates (`event_type`), then those of every active meter that is not builtin
        (`event_type` is the meter's key, `dimensions` its dimension values). Empty means
        every number adds up.

        One statement over the window's events (about a month's for a one-month window);
        `metering reconcile` walks a long window month by month."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            # a generic plan would keep `$3 IS NULL OR ..` and read every org's events
            await conn.execute(FORCE_CUSTOM_PLAN)
            found = [dict(r) for r in await conn.fetch(RECONCILE, start, end, org_id)]
            meters: list[str] = await conn.fetchval(RECONCILED_METERS) or []
            if meters:
                watermark = await conn.fetchval(WATERMARK)
                for check in (RECONCILE_METERS, RECONCILE_READINGS):
                    found += [
                        dict(r)
                        for r in await conn.fetch(check, start, end, org_id, meters, watermark)
                    ]
            return found


def limit_usages(applied: asyncpg.Record) -> list[LimitUsage]:
    """The touched limits an aggregation_pass or meter_pass row hands over: those that
    reach the lowest of their thresholds, with the thresholds already recorded."""
    usages = []
    for org, feature, period, start, used, limit, padded, mask in zip(
        applied["limit_orgs"],
        applied["limit_features"],
        applied["limit_periods"],
        applied["limit_starts"],
        applied["limit_used"],
        applied["limit_values"],
        applied["limit_thresholds"],
        applied["limit_notified"],
        strict=True,
    ):
        thresholds = tuple(t for t in padded if t is not None)
        usages.append(
            LimitUsage(
                org,
                feature,
                period,
                start,
                Decimal(used),
                limit,
                notified_set(mask, thresholds),
                thresholds,
            )
        )
    return usages


def notified_set(mask: int, thresholds: tuple[int, ...] = THRESHOLDS) -> frozenset[int]:
    """The thresholds a bit mask from aggregation_pass marks as recorded: bit i stands for
    thresholds[i], the limit's thresholds in the order the pass handed them over."""
    return frozenset(t for i, t in enumerate(thresholds) if mask >> i & 1)


def crossing_columns(items: list[Crossing]) -> tuple[list[Any], ...]:
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
# Only events below the watermark and not cancelled below it count: those are exactly
# what the aggregates cover.
# The events read are those that can fall in a period starting in [$1, $2) in any zone
# (offsets are within -12h..+14h of UTC): from a day before $1 to a day after the end of
# the last month starting before $2, both in UTC whatever the session's TimeZone. So a
# window of one month reads about one month of events. $3, when not NULL, is the one
# organization to check (its events found by the (org_id, occurred_at) index; the caller
# plans the statement for its parameters, plan_cache_mode).
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
      AND (e.cancel_xid IS NULL OR e.cancel_xid >= wm.watermark_xid)
      AND e.occurred_at >= ($1::date - 1)::timestamp AT TIME ZONE 'UTC'
      AND e.occurred_at < (date_trunc('month', ($2::date - 1)::timestamp)
                           + interval '1 month 1 day') AT TIME ZONE 'UTC'
      AND ($3::uuid IS NULL OR e.org_id = $3)
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
    FROM usage_aggregations
    WHERE period_start >= $1 AND period_start < $2 AND ($3::uuid IS NULL OR org_id = $3)
)
SELECT org_id, event_type, period, period_start,
       x.value AS expected_value, a.value AS stored_value,
       x.event_count AS expected_events, a.event_count AS stored_events
FROM (SELECT * FROM expected WHERE period_start >= $1 AND period_start < $2) x
FULL JOIN stored a USING (org_id, event_type, period, period_start)
WHERE x.value IS DISTINCT FROM a.value OR x.event_count IS DISTINCT FROM a.event_count
ORDER BY org_id, event_type, period, period_start
"""


# Meters that are not builtin: recomputed through meter_event_readings (the reading rules),
# grouped with plain SQL aggregates, against meter_aggregations. Active meters only: a
# backfilling one is not complete yet, an archived one stopped counting on purpose.
RECONCILED_METERS = (
    "SELECT array_agg(key ORDER BY key) FROM meters WHERE NOT builtin AND status = 'active'"
)
WATERMARK = "SELECT watermark_xid FROM aggregator_state WHERE name = 'meters'"
RECONCILE_METERS = """
WITH ev AS (
    SELECT r.org_id, r.meter_key, r.aggregation, r.dimensions, p.period, r.number,
           r.unique_value, r.occurred_at,
           CASE p.period
               WHEN 'day' THEN (r.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))::date
               ELSE date_trunc('month',
                               r.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))::date
           END AS period_start
    FROM meter_event_readings(
             $4::text[], $3::uuid, 0, $5::bigint,
             ($1::date - 1)::timestamp AT TIME ZONE 'UTC',
             (date_trunc('month', ($2::date - 1)::timestamp) + interval '1 month 1 day')
                 AT TIME ZONE 'UTC') r
    LEFT JOIN org_subscriptions s ON s.org_id = r.org_id
    CROSS JOIN (VALUES ('day'), ('month')) AS p (period)
    WHERE r.skipped IS NULL AND r.aggregation <> 'time_weighted'
), expected AS (
    SELECT org_id, meter_key, dimensions, period, period_start, count(*) AS event_count,
           CASE min(aggregation)
               WHEN 'max' THEN max(number)
               WHEN 'latest' THEN (array_agg(number ORDER BY occurred_at DESC, number DESC))[1]
               WHEN 'unique_count' THEN count(DISTINCT unique_value)
               ELSE sum(number)
           END AS value
    FROM ev GROUP BY org_id, meter_key, dimensions, period, period_start
), stored AS (
    SELECT org_id, meter_key, dimensions, period, period_start, value, event_count
    FROM meter_aggregations
    WHERE period_start >= $1 AND period_start < $2 AND ($3::uuid IS NULL OR org_id = $3)
      AND meter_key = ANY ($4::text[])
)
SELECT org_id, meter_key AS event_type, dimensions::text AS dimensions, period, period_start,
       x.value AS expected_value, a.value AS stored_value,
       x.event_count AS expected_events, a.event_count AS stored_events
FROM (SELECT * FROM expected WHERE period_start >= $1 AND period_start < $2) x
FULL JOIN stored a USING (org_id, meter_key, dimensions, period, period_start)
WHERE x.value IS DISTINCT FROM a.value OR x.event_count IS DISTINCT FROM a.event_count
ORDER BY org_id, meter_key, dimensions, period, period_start
"""
# time_weighted meters keep readings, not period rows: every reading of the window's days
# (in UTC) must be the largest value its meter read at that instant, and no other.
RECONCILE_READINGS = """
WITH expected AS (
    SELECT r.org_id, r.meter_key, r.dimensions, r.occurred_at, max(r.number) AS value,
           count(*) AS events
    FROM meter_event_readings($4::text[], $3::uuid, 0, $5::bigint,
                              $1::date::timestamp AT TIME ZONE 'UTC',
                              $2::date::timestamp AT TIME ZONE 'UTC') r
    WHERE r.skipped IS NULL AND r.aggregation = 'time_weighted'
    GROUP BY 1, 2, 3, 4
), stored AS (
    SELECT org_id, meter_key, dimensions, occurred_at, value FROM meter_readings
    WHERE meter_key = ANY ($4::text[]) AND ($3::uuid IS NULL OR org_id = $3)
      AND occurred_at >= $1::date::timestamp AT TIME ZONE 'UTC'
      AND occurred_at < $2::date::timestamp AT TIME ZONE 'UTC'
)
SELECT org_id, meter_key AS event_type, dimensions::text AS dimensions, 'reading' AS period,
       occurred_at AS period_start, x.value AS expected_value, a.value AS stored_value,
       x.events AS expected_events, CASE WHEN a.value IS NULL THEN 0 ELSE 1 END AS stored_events
FROM expected x
FULL JOIN stored a USING (org_id, meter_key, dimensions, occurred_at)
WHERE x.value IS DISTINCT FROM a.value
ORDER BY org_id, meter_key, dimensions, occurred_at
"""
