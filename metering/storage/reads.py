"""The API's storage: reads as the `metering_reader` role restricted to one organization
by row-level security, and the admin writes (subscriptions)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import date
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from metering.storage.audit import AuditLog

# Every read runs in a transaction whose role is the read-only role and whose
# metering.org_id setting is the organization the request is about: row-level security
# then hides every other organization's rows, whatever the query.
AS_READER_OF_ORG = (
    "SELECT set_config('role', 'metering_reader', true), set_config('metering.org_id', $1, true)"
)
ENTITLEMENTS = """
SELECT pf.feature_key, check_feature_access(NULL, pf.feature_key, $1, 0) AS access
FROM plan_features pf
WHERE pf.plan = coalesce((SELECT plan FROM org_subscriptions WHERE org_id = $1), 'free')
ORDER BY pf.feature_key
"""
PLANS = """
SELECT p.plan, p.rank, pf.feature_key, pf.limit_value, pf.flags
FROM plans p JOIN plan_features pf USING (plan)
ORDER BY p.rank, pf.feature_key
"""
ANCHOR_BEFORE = "SELECT billing_anchor FROM org_subscriptions WHERE org_id = $1 FOR UPDATE"
# $7 the billing anchor, set only when $8 (a PUT that leaves it out keeps it)
UPSERT_SUBSCRIPTION = """
INSERT INTO org_subscriptions AS s
    (org_id, plan, status, seats, seats_in_use, timezone, billing_anchor)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (org_id) DO UPDATE
SET plan = excluded.plan, status = excluded.status, seats = excluded.seats,
    seats_in_use = excluded.seats_in_use, timezone = excluded.timezone,
    billing_anchor = CASE WHEN $8 THEN excluded.billing_anchor ELSE s.billing_anchor END
RETURNING org_id, plan, status, seats, seats_in_use, timezone, billing_anchor, updated_at
"""
PLAN_EXISTS = "SELECT EXISTS (SELECT 1 FROM plans WHERE plan = $1)"
ZONE_VALID = "SELECT is_valid_timezone($1)"
USAGE_ROWS = """
SELECT event_type, period, period_start, value, event_count, updated_at
FROM usage_aggregations
WHERE org_id = $1 AND period = $2
  AND ($3::date IS NULL OR period_start >= $3) AND ($4::date IS NULL OR period_start < $4)
  AND ($5::text IS NULL OR event_type = $5)
ORDER BY period_start, event_type
"""
# cycles whose start is in [$3, $4) (default: those of the last year and the current one)
USAGE_BY_CYCLE = """
SELECT event_type, period, period_start, period_end, value, event_count, updated_at
FROM usage_by_cycle($1, coalesce($2::date, (now() - interval '1 year')::date),
                    coalesce($3::date, (now() + interval '1 day')::date), $4)
"""
READER_CHECK = "SELECT reader_check_feature_access($1, $2, $3)"
# The organization's plan, zone and anchor, and its current period in its zone: the billing
# cycle holding today with an anchor (billing_cycle, metering/schema/50_limits.sql), else
# the calendar month. An organization without a subscription: the free plan, UTC.
CURRENT_PERIOD = """
SELECT coalesce(s.plan, 'free') AS plan, coalesce(s.timezone, 'UTC') AS timezone,
       s.billing_anchor, t.today, c.start, c.stop
FROM (SELECT $1::uuid AS org_id) o
LEFT JOIN org_subscriptions s USING (org_id)
CROSS JOIN LATERAL (SELECT (now() AT TIME ZONE coalesce(s.timezone, 'UTC'))::date AS today) t
CROSS JOIN LATERAL (
    SELECT b.cycle_start AS start, b.cycle_end AS stop
    FROM billing_cycle(s.billing_anchor, t.today) b WHERE s.billing_anchor IS NOT NULL
    UNION ALL
    SELECT date_trunc('month', t.today)::date,
           (date_trunc('month', t.today) + interval '1 month')::date
    WHERE s.billing_anchor IS NULL
) c
"""


@asynccontextmanager
async def as_reader_of_org(
    pool: asyncpg.Pool, org_id: UUID
) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
    """A read-only transaction as `metering_reader` scoped to `org_id` (one round trip):
    row-level security hides every other organization's rows, whatever the query."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute(AS_READER_OF_ORG, str(org_id))
        yield conn


class ReadStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def _as_org(
        self, org_id: UUID
    ) -> AbstractAsyncContextManager[asyncpg.pool.PoolConnectionProxy]:
        return as_reader_of_org(self._pool, org_id)

    async def check_json(self, org_id: UUID, feature_key: str, requested: Decimal) -> str | None:
        """The access check as the reader role scoped to `org_id` (one round trip), as the
        JSON text PostgreSQL wrote (every number exact: no float on the way), or None for a
        feature key no plan has."""
        async with self._pool.acquire() as conn:
            raw: str | None = await conn.fetchval(READER_CHECK, org_id, feature_key, requested)
        return raw

    async def check(
        self, org_id: UUID, feature_key: str, requested: Decimal
    ) -> dict[str, Any] | None:
        """`check_json`, parsed: numbers as int or exact Decimal."""
        raw = await self.check_json(org_id, feature_key, requested)
        return None if raw is None else exact_json(raw)

    async def entitlements_json(
        self, org_id: UUID, hidden: frozenset[str] = frozenset()
    ) -> list[str]:
        """Every feature's access check (as `check_json`) for the org's plan, but none of
        `hidden` (the limits of meters a portal token may not read)."""
        async with self._as_org(org_id) as conn:
            rows = await conn.fetch(ENTITLEMENTS, org_id)
        return [r["access"] for r in rows if r["feature_key"] not in hidden]

    async def current_period(self, org_id: UUID) -> asyncpg.Record:
        """plan, timezone, billing_anchor, today, and the current period [start, stop)."""
        async with self._as_org(org_id) as conn:
            row = await conn.fetchrow(CURRENT_PERIOD, org_id)
        assert row is not None
        return row

    async def usage(
        self,
        org_id: UUID,
        period: str,
        start: date | None,
        end: date | None,
        event_type: str | None,
    ) -> list[asyncpg.Record]:
        async with self._as_org(org_id) as conn:
            if period == "cycle":
                return list(await conn.fetch(USAGE_BY_CYCLE, org_id, start, end, event_type))
            return list(await conn.fetch(USAGE_ROWS, org_id, period, start, end, event_type))

    async def plans(self) -> list[asyncpg.Record]:
        async with self._pool.acquire() as conn:
            return list(await conn.fetch(PLANS))

    async def ping(self) -> None:
        async with self._pool.acquire() as conn:
            await conn.fetchval("SELECT 1")


class SubscriptionStore:
    """Admin writes; the caller has checked the admin scope."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def plan_exists(self, plan: str) -> bool:
        async with self._pool.acquire() as conn:
            return bool(await conn.fetchval(PLAN_EXISTS, plan))

    async def zone_valid(self, zone: str) -> bool:
        async with self._pool.acquire() as conn:
            return bool(await conn.fetchval(ZONE_VALID, zone))

    async def put(
        self,
        org_id: UUID,
        plan: str,
        status: str,
        seats: int,
        seats_in_use: int,
        timezone: str,
        billing_anchor: date | None = None,
        *,
        set_anchor: bool = False,
        actor: str | None = None,
    ) -> asyncpg.Record:
        """Create or replace the subscription (the billing anchor only when `set_anchor`);
        a changed anchor is recorded in the audit trail by `actor`, in the same transaction.
        Raises asyncpg.CheckViolationError for values out of range."""
        async with self._pool.acquire() as conn, conn.transaction():
            before: date | None = await conn.fetchval(ANCHOR_BEFORE, org_id)
            row = await conn.fetchrow(
                UPSERT_SUBSCRIPTION,
                org_id,
                plan,
                status,
                seats,
                seats_in_use,
                timezone,
                billing_anchor,
                set_anchor,
            )
            assert row is not None
            if row["billing_anchor"] != before:
                await AuditLog(self._pool).record(
                    actor or "unknown",
                    "subscription.billing_anchor",
                    {
                        "old": str(before) if before else None,
                        "new": str(row["billing_anchor"]) if row["billing_anchor"] else None,
                    },
                    org_id,
                    conn,
                )
        return row


def exact_json(text: str) -> dict[str, Any]:
    """A JSON object with its decimal numbers as Decimal (never a binary float)."""
    result: dict[str, Any] = json.loads(text, parse_float=Decimal)
    return result
