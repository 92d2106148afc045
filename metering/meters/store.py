"""The `meters` table: create, list, show and archive meters (contract section 2).

Creating a meter inserts it as `backfilling`; the aggregator counts its new events from its
next pass on and backfills the stored ones (aggregator/backfill.py), then marks it `active`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from metering.errors import MeteringError
from metering.meters.definition import MeterSpec

INSERT_METER = """
INSERT INTO meters (key, event_type, aggregation, value, filter, group_by, limit_key,
                    limit_scope, limit_unit, description, created_by, filter_docs)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12::jsonb[])
RETURNING *
"""
SELECT_METERS = "SELECT * FROM meters ORDER BY created_at, key"
SELECT_METER = "SELECT * FROM meters WHERE key = $1"
ARCHIVE_METER = """
UPDATE meters SET status = 'archived', archived_at = now()
WHERE key = $1 AND status <> 'archived' AND NOT builtin
RETURNING *
"""
FEATURE_EXISTS = "SELECT EXISTS (SELECT 1 FROM plan_features WHERE feature_key = $1)"


class MeterNotFound(MeteringError):
    """No meter has this key (`metering meters list` shows them)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no meter named {key!r}")
        self.key = key


class MeterConflict(MeteringError):
    """The meter cannot be created or changed as asked: `reason` says why (a key taken, a
    limit another meter counts, a builtin meter)."""

    def __init__(self, key: str, code: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Meter:
    """A stored meter, with its backfill's progress."""

    row: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.row["key"])

    @property
    def status(self) -> str:
        return str(self.row["status"])

    def backfill_fraction(self) -> float | None:
        """How much of the backfill is done (0..1), None before it started."""
        if self.row["backfilled_at"] is not None:
            return 1.0
        total = self.row["backfill_total"]
        if total is None:
            return None
        if total == 0:
            return 0.0
        fraction: float = self.row["backfill_read"] / total
        return max(0.0, min(1.0, fraction))

    def document(self) -> dict[str, Any]:
        """The meter as the API shows it (contract section 2 fields plus backfill)."""
        r = self.row
        filter_doc = {".".join(f["path"]): f["values"] for f in json.loads(r["filter"])}
        fraction = self.backfill_fraction()
        return {
            "key": r["key"],
            "event_type": r["event_type"],
            "aggregation": r["aggregation"],
            "value": r["value"],
            "filter": {k: v[0] if len(v) == 1 else v for k, v in filter_doc.items()},
            "group_by": list(r["group_by"]),
            "limit_key": r["limit_key"],
            "limit_scope": r["limit_scope"],
            "limit_unit": str(r["limit_unit"]),
            "description": r["description"],
            "status": r["status"],
            "builtin": r["builtin"],
            "created_at": _iso(r["created_at"]),
            "archived_at": _iso(r["archived_at"]),
            "backfill": {
                "events": r["backfill_total"],
                "read": r["backfill_read"],
                "fraction": fraction,
                "finished_at": _iso(r["backfilled_at"]),
                "waiting_for_aggregator": r["counted_from_xid"] is None
                and r["status"] == "backfilling",
            },
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


class MeterStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(self, spec: MeterSpec, created_by: str | None = None) -> Meter:
        """Insert `spec` as a backfilling meter. Raises MeterConflict for a key that exists
        (archived meters keep theirs: keys are never reused), a limit key no plan has, or
        a limit another meter already counts."""
        async with self._pool.acquire() as conn:
            if spec.limit_key is not None and not await conn.fetchval(
                FEATURE_EXISTS, spec.limit_key
            ):
                raise MeterConflict(
                    spec.key,
                    "unknown_limit_key",
                    f"no plan has a feature {spec.limit_key!r} (GET /v1/plans lists them)",
                )
            try:
                row = await conn.fetchrow(
                    INSERT_METER,
                    spec.key,
                    spec.event_type,
                    spec.aggregation.value,
                    spec.value,
                    json.dumps(spec.filter_document()),
                    list(spec.group_by),
                    spec.limit_key,
                    spec.limit_scope,
                    Decimal(spec.limit_unit),
                    spec.description,
                    created_by,
                    None
                    if (docs := spec.filter_containments()) is None
                    else [json.dumps(d) for d in docs],
                )
            except asyncpg.UniqueViolationError as error:
                if error.constraint_name == "meters_one_per_limit":
                    raise MeterConflict(
                        spec.key,
                        "limit_taken",
                        f"another meter already counts against {spec.limit_key!r}; "
                        "archive it first",
                    ) from None
                raise MeterConflict(
                    spec.key,
                    "key_taken",
                    f"a meter named {spec.key!r} exists or existed (keys are never reused)",
                ) from None
        assert row is not None
        return Meter(dict(row))

    async def list(self) -> list[Meter]:
        async with self._pool.acquire() as conn:
            return [Meter(dict(r)) for r in await conn.fetch(SELECT_METERS)]

    async def get(self, key: str) -> Meter:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(SELECT_METER, key)
        if row is None:
            raise MeterNotFound(key)
        return Meter(dict(row))

    async def archive(self, key: str) -> Meter:
        """Stop counting `key` (its numbers stay). Archiving twice is harmless; a builtin
        meter cannot be archived (v1's promises rest on it)."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(ARCHIVE_METER, key)
            if row is None:
                current = await conn.fetchrow(SELECT_METER, key)
                if current is None:
                    raise MeterNotFound(key)
                if current["builtin"]:
                    raise MeterConflict(
                        key, "builtin_meter", f"{key!r} is a seeded meter of v1; it stays"
                    )
                return Meter(dict(current))
        return Meter(dict(row))
