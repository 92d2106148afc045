"""The webhook tables (migration 018): endpoints, the outbox of deliveries (one row per
message and endpoint, written by triggers in the transaction that records the crossing or
the notification), and the log of attempts. Every time the deliverer writes comes from its
clock (a parameter), so the back-off can be tested on a clock of its own."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from metering.errors import MeteringError

MAX_ENDPOINTS = 20
WebhookType = Literal["limit.crossed", "meter.backfilled"]
WEBHOOK_TYPES: tuple[WebhookType, ...] = ("limit.crossed", "meter.backfilled")

INSERT_ENDPOINT = """
INSERT INTO webhook_endpoints (id, url, org_id, types, description, secret, created_by)
SELECT $1, $2, $3, $4, $5, $6, $7
WHERE (SELECT count(*) FROM webhook_endpoints WHERE deleted_at IS NULL) < $8
RETURNING id, url, org_id, types, description, secret, created_at, created_by
"""
LOCK_ENDPOINTS = "LOCK TABLE webhook_endpoints IN SHARE ROW EXCLUSIVE MODE"
LIST_ENDPOINTS = """
SELECT id, url, org_id, types, description, secret, created_at, created_by
FROM webhook_endpoints WHERE deleted_at IS NULL ORDER BY created_at
"""
GET_ENDPOINT = """
SELECT id, url, org_id, types, description, secret, created_at, created_by
FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL
"""
DELETE_ENDPOINT = """
UPDATE webhook_endpoints SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL RETURNING id
"""
# $1 endpoint, $2 status (NULL: any), $3 below this id (NULL: from the newest), $4 how many
LIST_DELIVERIES = """
SELECT id, endpoint_id, message_id, type, org_id, status, attempts, created_at,
       next_attempt_at, first_attempt_at, delivered_at, last_error
FROM webhook_deliveries
WHERE endpoint_id = $1 AND ($2::text IS NULL OR status = $2)
  AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC LIMIT $4
"""
ATTEMPTS = """
SELECT delivery_id, attempt, started_at, status_code, latency_ms, error
FROM webhook_attempts WHERE delivery_id = ANY ($1::bigint[]) ORDER BY delivery_id, attempt
"""
# by hand: pending again, due now, with a fresh 24-hour window of retries
REDELIVER = """
UPDATE webhook_deliveries d
SET status = 'pending', next_attempt_at = $3, first_attempt_at = NULL, delivered_at = NULL
FROM webhook_endpoints e
WHERE d.id = $2 AND d.endpoint_id = $1 AND e.id = d.endpoint_id AND e.deleted_at IS NULL
RETURNING d.id, d.endpoint_id, d.message_id, d.type, d.org_id, d.status, d.attempts,
          d.created_at, d.next_attempt_at, d.first_attempt_at, d.delivered_at, d.last_error
"""
# The oldest due delivery of each endpoint not busy ($2), at most $3 of them, claimed until
# $1 + $4 seconds: a deliverer that dies mid-request leaves it to be sent again then (with
# the same webhook-id). The UPDATE re-checks the row under its lock, so two deliverers
# never claim the same delivery.
CLAIM = """
WITH due AS (
    SELECT DISTINCT ON (d.endpoint_id) d.id
    FROM webhook_deliveries d
    JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.deleted_at IS NULL
    WHERE d.status = 'pending' AND d.next_attempt_at <= $1
      AND NOT (d.endpoint_id = ANY ($2::uuid[]))
    ORDER BY d.endpoint_id, d.next_attempt_at, d.id
), picked AS (
    SELECT id FROM due ORDER BY id LIMIT $3
), claimed AS (
    UPDATE webhook_deliveries d
    SET next_attempt_at = $1 + make_interval(secs => $4)
    FROM picked
    WHERE d.id = picked.id AND d.status = 'pending' AND d.next_attempt_at <= $1
    RETURNING d.id, d.endpoint_id, d.message_id, d.body, d.attempts, d.first_attempt_at
)
SELECT c.*, e.url, e.secret FROM claimed c JOIN webhook_endpoints e ON e.id = c.endpoint_id
"""
RECORD_ATTEMPT = """
WITH logged AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, started_at, status_code, latency_ms, error)
    SELECT id, attempts + 1, $2, $3, $4, $5 FROM webhook_deliveries WHERE id = $1
)
UPDATE webhook_deliveries
SET attempts = attempts + 1,
    first_attempt_at = coalesce(first_attempt_at, $2),
    status = $6::text,
    next_attempt_at = coalesce($7::timestamptz, next_attempt_at),
    delivered_at = CASE WHEN $6::text = 'delivered' THEN $8::timestamptz END,
    last_error = $5
WHERE id = $1
"""
BACKLOG = """
SELECT count(*) AS pending, min(created_at) AS oldest FROM webhook_deliveries
WHERE status = 'pending'
"""
NOTIFY_DUE = "SELECT pg_notify('metering_webhooks', '')"


@dataclass(frozen=True)
class Endpoint:
    id: uuid.UUID
    url: str
    org_id: uuid.UUID | None
    types: list[str]
    description: str
    secret: str
    created_at: datetime
    created_by: str | None

    def document(self, *, with_secret: bool = False) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "id": str(self.id),
            "url": self.url,
            "org_id": str(self.org_id) if self.org_id else None,
            "types": self.types,
            "description": self.description,
            "created_at": self.created_at.isoformat(),
        }
        if with_secret:
            shown["secret"] = self.secret
        return shown


@dataclass(frozen=True)
class Delivery:
    id: int
    endpoint_id: uuid.UUID
    message_id: str
    type: str
    org_id: uuid.UUID | None
    status: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    first_attempt_at: datetime | None
    delivered_at: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    attempt: int
    started_at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None


@dataclass(frozen=True)
class Claimed:
    """A delivery taken by a deliverer, with what it needs to send it."""

    id: int
    endpoint_id: uuid.UUID
    message_id: str
    body: str
    attempts: int
    first_attempt_at: datetime | None
    url: str
    secret: str


class TooManyEndpoints(MeteringError):
    """MAX_ENDPOINTS endpoints exist already: remove one first (`metering webhooks remove`)."""

    def __init__(self) -> None:
        super().__init__(f"at most {MAX_ENDPOINTS} webhook endpoints; remove one first")


def _endpoint(row: asyncpg.Record) -> Endpoint:
    return Endpoint(
        row["id"],
        row["url"],
        row["org_id"],
        list(row["types"]),
        row["description"],
        row["secret"],
        row["created_at"],
        row["created_by"],
    )


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(*(row[name] for name in Delivery.__dataclass_fields__))


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def add_endpoint(
        self,
        url: str,
        org_id: uuid.UUID | None,
        types: list[str],
        description: str,
        secret: str,
        created_by: str | None,
    ) -> Endpoint:
        """Store an endpoint; raises TooManyEndpoints at MAX_ENDPOINTS active ones."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_ENDPOINTS)  # the count and the insert, one at a time
            row = await conn.fetchrow(
                INSERT_ENDPOINT,
                uuid.uuid4(),
                url,
                org_id,
                types,
                description,
                secret,
                created_by,
                MAX_ENDPOINTS,
            )
        if row is None:
            raise TooManyEndpoints
        return _endpoint(row)

    async def endpoints(self) -> list[Endpoint]:
        async with self._pool.acquire() as conn:
            return [_endpoint(r) for r in await conn.fetch(LIST_ENDPOINTS)]

    async def endpoint(self, endpoint_id: uuid.UUID) -> Endpoint | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(GET_ENDPOINT, endpoint_id)
        return _endpoint(row) if row is not None else None

    async def remove_endpoint(self, endpoint_id: uuid.UUID) -> bool:
        """Remove it (its pending deliveries stop; the log stays readable)."""
        async with self._pool.acquire() as conn:
            return await conn.fetchval(DELETE_ENDPOINT, endpoint_id) is not None

    async def deliveries(
        self,
        endpoint_id: uuid.UUID,
        *,
        status: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[tuple[Delivery, list[Attempt]]]:
        """An endpoint's deliveries, newest first, each with its attempts."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(LIST_DELIVERIES, endpoint_id, status, before_id, limit)
            attempts = await conn.fetch(ATTEMPTS, [r["id"] for r in rows])
        by_delivery: dict[int, list[Attempt]] = {}
        for a in attempts:
            by_delivery.setdefault(a["delivery_id"], []).append(Attempt(*a.values()))
        return [(_delivery(r), by_delivery.get(r["id"], [])) for r in rows]

    async def redeliver(
        self, endpoint_id: uuid.UUID, delivery_id: int, now: datetime
    ) -> Delivery | None:
        """Send a delivered or failed message again (pending, due now); None if unknown."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(REDELIVER, endpoint_id, delivery_id, now)
            if row is not None:
                await conn.execute(NOTIFY_DUE)
        return _delivery(row) if row is not None else None

    async def claim(
        self, now: datetime, busy: list[uuid.UUID], limit: int, lease_seconds: float
    ) -> list[Claimed]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(CLAIM, now, busy, limit, lease_seconds)
        return [
            Claimed(
                r["id"],
                r["endpoint_id"],
                r["message_id"],
                r["body"],
                r["attempts"],
                r["first_attempt_at"],
                r["url"],
                r["secret"],
            )
            for r in rows
        ]

    async def record_attempt(
        self,
        delivery_id: int,
        *,
        started_at: datetime,
        status_code: int | None,
        latency_ms: float,
        error: str | None,
        outcome: str,
        next_attempt_at: datetime | None,
        finished_at: datetime,
    ) -> None:
        """Log one attempt and set the delivery's status: `delivered`, `pending` (again at
        `next_attempt_at`) or `failed`."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                RECORD_ATTEMPT,
                delivery_id,
                started_at,
                status_code,
                latency_ms,
                error,
                outcome,
                next_attempt_at,
                finished_at,
            )

    async def backlog(self) -> tuple[int, datetime | None]:
        """Pending deliveries, and when the oldest of them was created."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(BACKLOG)
        assert row is not None
        return row["pending"], row["oldest"]
