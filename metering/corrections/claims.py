"""Which event ids were stored since a moment: what a replay or an import stored now, as
opposed to ids the service had already (duplicates, dropped by the dedupe key)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

NOW = "SELECT now()"
CLAIMED_SINCE = """
SELECT count(*) FROM usage_event_ids i
JOIN unnest($1::uuid[], $2::text[]) AS t (org_id, event_id) USING (org_id, event_id)
WHERE i.first_seen_at >= $3
"""


class Claims:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def now(self) -> datetime:
        """The database's clock (what `first_seen_at` is written with)."""
        async with self._pool.acquire() as conn:
            moment: datetime = await conn.fetchval(NOW)
        return moment

    async def stored_since(self, events: Sequence[tuple[UUID, str]], since: datetime) -> int:
        """How many of these distinct (org_id, id) were first stored at or after `since`."""
        unique = list(dict.fromkeys(events))
        if not unique:
            return 0
        async with self._pool.acquire() as conn:
            count: int = await conn.fetchval(
                CLAIMED_SINCE, [o for o, _ in unique], [i for _, i in unique], since
            )
        return count
