"""Cancelling stored events (contract section 10).

A cancelled event stays stored and its id stays claimed; it is marked with when, by whom
and why, and with the cancelling transaction's id, from which the aggregator's passes
recount every period the event was in (migration 017). Cancelling is idempotent: an event
already cancelled keeps its first cancellation. Events that occurred before the lateness
window are closed: they are refused, never half-cancelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Literal
from uuid import UUID

import asyncpg

from metering.errors import EventNotFound, OutsideLatenessWindow
from metering.storage.audit import AuditLog

CancelStatus = Literal[
    "cancelled", "already_cancelled", "would_cancel", "outside_window", "unknown"
]

# $1 org, $2 ids, $3 earliest occurred_at that may be cancelled, $4 actor, $5 reason
CANCEL_IDS = """
UPDATE usage_events
SET cancelled_at = now(), cancelled_by = $4, cancel_reason = $5,
    cancel_xid = pg_current_xact_id()::text::bigint
WHERE org_id = $1 AND event_id = ANY ($2::text[]) AND occurred_at >= $3
  AND cancelled_at IS NULL
RETURNING event_id
"""
# After CANCEL_IDS, in the same transaction: every listed event in the window, with its
# cancellation, and which of the listed ids were ever stored.
FOUND_IDS = """
SELECT event_id, event_type, occurred_at, quantity, cancelled_at, cancelled_by, cancel_reason
FROM usage_events
WHERE org_id = $1 AND event_id = ANY ($2::text[]) AND occurred_at >= $3
"""
CLAIMED_IDS = """
SELECT event_id FROM usage_event_ids WHERE org_id = $1 AND event_id = ANY ($2::text[])
"""
# $1 org, $2 type (NULL: every type), $3/$4 the occurred_at range
PREVIEW = """
SELECT e.event_type,
       (e.occurred_at AT TIME ZONE coalesce(
           (SELECT timezone FROM org_subscriptions WHERE org_id = $1), 'UTC'))::date AS day,
       count(*) AS events, sum(e.quantity) AS quantity
FROM usage_events e
WHERE e.org_id = $1 AND ($2::text IS NULL OR e.event_type = $2)
  AND e.occurred_at >= $3 AND e.occurred_at < $4 AND e.cancelled_at IS NULL
GROUP BY 1, 2 ORDER BY 2, 1
"""
# the same events; $5 actor, $6 reason
CANCEL_MATCHING = """
UPDATE usage_events
SET cancelled_at = now(), cancelled_by = $5, cancel_reason = $6,
    cancel_xid = pg_current_xact_id()::text::bigint
WHERE org_id = $1 AND ($2::text IS NULL OR event_type = $2)
  AND occurred_at >= $3 AND occurred_at < $4 AND cancelled_at IS NULL
"""


@dataclass(frozen=True)
class Cancellation:
    """What became of one id."""

    event_id: str
    status: CancelStatus
    event_type: str | None = None
    occurred_at: datetime | None = None
    quantity: Decimal | None = None
    cancelled_at: datetime | None = None
    cancelled_by: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class PreviewRow:
    event_type: str
    day: date
    events: int
    quantity: Decimal


class CancelStore:
    def __init__(self, pool: asyncpg.Pool, audit: AuditLog, lateness_window: timedelta) -> None:
        self._pool = pool
        self._audit = audit
        self._lateness = lateness_window

    async def earliest_cancellable(self) -> datetime:
        """The oldest occurred_at that may still be cancelled (now - lateness window, by
        the database's clock)."""
        async with self._pool.acquire() as conn:
            now: datetime = await conn.fetchval("SELECT now()")
        return now - self._lateness

    async def cancel_ids(
        self, org_id: UUID, event_ids: Sequence[str], *, actor: str, reason: str
    ) -> list[Cancellation]:
        """Cancel the listed events of `org_id` in one transaction (with its audit entry);
        returns one outcome per distinct id, in the order given. Ids unknown or outside the
        window are reported, not raised (see `cancel_one` for the single-event errors)."""
        ids = list(dict.fromkeys(event_ids))
        async with self._pool.acquire() as conn, conn.transaction():
            bound: datetime = await conn.fetchval("SELECT now()") - self._lateness
            cancelled = await conn.fetch(CANCEL_IDS, org_id, ids, bound, actor, reason)
            changed = {r["event_id"] for r in cancelled}
            found = {r["event_id"]: r for r in await conn.fetch(FOUND_IDS, org_id, ids, bound)}
            claimed = {r["event_id"] for r in await conn.fetch(CLAIMED_IDS, org_id, ids)}
            outcomes = [_outcome(i, changed, found, claimed) for i in ids]
            if changed:
                await self._audit.record(
                    actor,
                    "events.cancel",
                    {
                        "reason": reason,
                        "cancelled": len(changed),
                        "ids": [o.event_id for o in outcomes if o.status == "cancelled"][:100],
                    },
                    org_id,
                    conn,
                )
        return outcomes

    async def lookup(self, org_id: UUID, event_ids: Sequence[str]) -> list[Cancellation]:
        """What cancel_ids would do, changing nothing (`would_cancel` for the events it
        would cancel)."""
        ids = list(dict.fromkeys(event_ids))
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            bound: datetime = await conn.fetchval("SELECT now()") - self._lateness
            found = {r["event_id"]: r for r in await conn.fetch(FOUND_IDS, org_id, ids, bound)}
            claimed = {r["event_id"] for r in await conn.fetch(CLAIMED_IDS, org_id, ids)}
        return [_outcome(i, None, found, claimed) for i in ids]

    async def cancel_one(
        self, org_id: UUID, event_id: str, *, actor: str, reason: str
    ) -> Cancellation:
        """Cancel one event; returns its cancellation (the first one if it was already
        cancelled). Raises EventNotFound (never stored) or OutsideLatenessWindow."""
        (outcome,) = await self.cancel_ids(org_id, [event_id], actor=actor, reason=reason)
        if outcome.status == "unknown":
            raise EventNotFound(org_id, event_id)
        if outcome.status == "outside_window":
            raise OutsideLatenessWindow(org_id, event_id, await self.earliest_cancellable())
        return outcome

    async def preview(
        self, org_id: UUID, event_type: str | None, start: datetime, end: datetime
    ) -> list[PreviewRow]:
        """What cancel_matching would cancel: events and quantity per type and day (in the
        organization's zone)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(PREVIEW, org_id, event_type, start, end)
        return [PreviewRow(r["event_type"], r["day"], r["events"], r["quantity"]) for r in rows]

    async def cancel_matching(
        self,
        org_id: UUID,
        event_type: str | None,
        start: datetime,
        end: datetime,
        *,
        actor: str,
        reason: str,
    ) -> int:
        """Cancel every event of `org_id` (of `event_type` when given) that occurred in
        [start, end) and is not cancelled yet, in one transaction with its audit entry;
        returns how many. Raises OutsideLatenessWindow when `start` is before the window
        (nothing is cancelled: a partial cancellation would be easy to misread)."""
        async with self._pool.acquire() as conn, conn.transaction():
            bound: datetime = await conn.fetchval("SELECT now()") - self._lateness
            if start < bound:
                raise OutsideLatenessWindow(org_id, f"*@{start.isoformat()}", bound)
            status: str = await conn.execute(
                CANCEL_MATCHING, org_id, event_type, start, end, actor, reason
            )
            count = int(status.rsplit(" ", 1)[1])
            if count:
                await self._audit.record(
                    actor,
                    "events.cancel",
                    {
                        "reason": reason,
                        "cancelled": count,
                        "criteria": {
                            "type": event_type,
                            "from": start.isoformat(),
                            "to": end.isoformat(),
                        },
                    },
                    org_id,
                    conn,
                )
        return count


def _outcome(
    event_id: str,
    changed: set[str] | None,
    found: dict[str, asyncpg.Record],
    claimed: set[str],
) -> Cancellation:
    row = found.get(event_id)
    if row is None:
        return Cancellation(event_id, "outside_window" if event_id in claimed else "unknown")
    status: CancelStatus
    if row["cancelled_at"] is not None and (changed is None or event_id not in changed):
        status = "already_cancelled"
    else:
        status = "would_cancel" if changed is None else "cancelled"
    return Cancellation(
        event_id,
        status,
        row["event_type"],
        row["occurred_at"],
        row["quantity"],
        row["cancelled_at"],
        row["cancelled_by"],
        row["cancel_reason"],
    )
