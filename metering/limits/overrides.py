"""An organization's own limits (org_limit_overrides, migration 020): set and removed in one
transaction with their audit entry (old and new value) and a re-check of the limit by the
next aggregation pass, so a limit lowered mid-period notifies what it now crosses, once.
Which limit applies is decided in SQL (effective_limit, metering/schema/50_limits.sql)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from metering.errors import MeteringError
from metering.storage.audit import AuditLog

FEATURE_EXISTS = """
SELECT EXISTS (SELECT 1 FROM plan_features WHERE feature_key = $1 AND limit_value IS NOT NULL)
"""
CURRENT = """
SELECT limit_value, soft, thresholds, updated_at, updated_by FROM org_limit_overrides
WHERE org_id = $1 AND feature_key = $2 FOR UPDATE
"""
UPSERT = """
INSERT INTO org_limit_overrides AS o
    (org_id, feature_key, limit_value, soft, thresholds, updated_by)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (org_id, feature_key) DO UPDATE
SET limit_value = excluded.limit_value, soft = excluded.soft, thresholds = excluded.thresholds,
    updated_at = now(), updated_by = excluded.updated_by
RETURNING limit_value, soft, thresholds, updated_at, updated_by
"""
DELETE = """
DELETE FROM org_limit_overrides WHERE org_id = $1 AND feature_key = $2
RETURNING limit_value, soft, thresholds, updated_at, updated_by
"""
RECHECK = """
INSERT INTO limit_rechecks (org_id, feature_key) VALUES ($1, $2)
ON CONFLICT (org_id, feature_key) DO UPDATE SET requested_at = now()
"""
EFFECTIVE = "SELECT limit_value, soft, thresholds, source, plan FROM effective_limit($1, $2)"


class UnknownLimit(MeteringError):
    """No plan has a limit named `feature_key` (`features` holds flags, not a limit): check
    the key against `GET /v1/plans`."""

    def __init__(self, feature_key: str) -> None:
        super().__init__(f"no plan has a limit {feature_key!r}")
        self.feature_key = feature_key


@dataclass(frozen=True)
class Override:
    limit: int
    soft: bool
    thresholds: list[int] | None
    updated_at: datetime
    updated_by: str | None

    def document(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "soft": self.soft,
            "thresholds": self.thresholds,
            "updated_at": self.updated_at.isoformat(),
            "updated_by": self.updated_by,
        }


@dataclass(frozen=True)
class EffectiveLimit:
    limit: int | None
    soft: bool
    thresholds: list[int]
    source: str  # 'override' or 'plan'
    plan: str

    def document(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "soft": self.soft,
            "thresholds": self.thresholds,
            "source": self.source,
            "plan": self.plan,
        }


def _override(row: asyncpg.Record | None) -> Override | None:
    if row is None:
        return None
    thresholds = list(row["thresholds"]) if row["thresholds"] is not None else None
    return Override(
        row["limit_value"], row["soft"], thresholds, row["updated_at"], row["updated_by"]
    )


class OverrideStore:
    def __init__(self, pool: asyncpg.Pool, audit: AuditLog) -> None:
        self._pool = pool
        self._audit = audit

    async def set(
        self,
        org_id: UUID,
        feature_key: str,
        *,
        limit: int,
        soft: bool,
        thresholds: list[int] | None,
        actor: str,
    ) -> tuple[Override | None, Override]:
        """Set the organization's own limit; returns (old, new). Raises UnknownLimit, or
        asyncpg.CheckViolationError for thresholds or a limit out of range."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(FEATURE_EXISTS, feature_key):
                raise UnknownLimit(feature_key)
            old = _override(await conn.fetchrow(CURRENT, org_id, feature_key))
            new = _override(
                await conn.fetchrow(UPSERT, org_id, feature_key, limit, soft, thresholds, actor)
            )
            assert new is not None
            await conn.execute(RECHECK, org_id, feature_key)
            await self._audit.record(
                actor,
                "limits.set",
                {
                    "feature_key": feature_key,
                    "old": old.document() if old else None,
                    "new": new.document(),
                },
                org_id,
                conn,
            )
        return old, new

    async def unset(self, org_id: UUID, feature_key: str, *, actor: str) -> Override | None:
        """Remove the organization's own limit (back to its plan's); returns the removed
        one, None when there was none (nothing audited then)."""
        async with self._pool.acquire() as conn, conn.transaction():
            old = _override(await conn.fetchrow(DELETE, org_id, feature_key))
            if old is not None:
                await conn.execute(RECHECK, org_id, feature_key)
                await self._audit.record(
                    actor,
                    "limits.unset",
                    {"feature_key": feature_key, "old": old.document(), "new": None},
                    org_id,
                    conn,
                )
        return old

    async def effective(self, org_id: UUID, feature_key: str) -> EffectiveLimit:
        """The limit that applies now (the override, else the plan's)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(EFFECTIVE, org_id, feature_key)
        assert row is not None
        return EffectiveLimit(
            row["limit_value"], row["soft"], list(row["thresholds"]), row["source"], row["plan"]
        )
