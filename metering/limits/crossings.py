"""The crossings the aggregator recorded (limit_notifications): an organization's recent
ones (`GET /v1/orgs/{org}/crossings`, its usage page), read as the reader role scoped to
that organization; and, for the operator overview, the organizations that crossed a
threshold lately."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from metering.storage.reads import as_reader_of_org

RECENT = """
SELECT id, feature_key, period, period_start, threshold_percent, used, limit_value,
       crossed_at
FROM limit_notifications
WHERE org_id = $1 AND NOT feature_key = ANY($2::text[])
ORDER BY crossed_at DESC, threshold_percent DESC
LIMIT $3
"""
# The organizations with a crossing since $1, the latest first: those near or past a limit
# (every limit has a threshold; the lowest is 80% unless a plan or override says otherwise)
ORGS_CROSSING_SINCE = """
SELECT org_id, max(crossed_at) AS last_crossed_at
FROM limit_notifications
WHERE crossed_at >= $1
GROUP BY org_id
ORDER BY last_crossed_at DESC
LIMIT $2
"""


@dataclass(frozen=True)
class Crossing:
    id: UUID
    feature_key: str
    period: str
    period_start: date | None
    threshold_percent: int
    used: Decimal
    limit_value: int
    crossed_at: datetime

    def document(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "feature_key": self.feature_key,
            "period": self.period,
            "period_start": None if self.period_start is None else self.period_start.isoformat(),
            "threshold_percent": self.threshold_percent,
            "used": format(self.used.normalize(), "f"),
            "limit": self.limit_value,
            "crossed_at": self.crossed_at.isoformat(),
        }


class CrossingStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def recent(
        self, org_id: UUID, limit: int, hidden_features: frozenset[str] = frozenset()
    ) -> list[Crossing]:
        """The organization's latest `limit` crossings, newest first, but none of
        `hidden_features`."""
        async with as_reader_of_org(self._pool, org_id) as conn:
            rows = await conn.fetch(RECENT, org_id, sorted(hidden_features), limit)
        return [Crossing(**dict(r)) for r in rows]

    async def organizations_crossing_since(
        self, since: datetime, limit: int
    ) -> list[tuple[UUID, datetime]]:
        """Organizations with a crossing since `since`, the latest first (operator view:
        every organization, not one)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(ORGS_CROSSING_SINCE, since, limit)
        return [(r["org_id"], r["last_crossed_at"]) for r in rows]
