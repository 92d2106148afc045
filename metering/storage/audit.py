"""The audit trail (`audit_log`, migration 017): who corrected what, and when."""

from __future__ import annotations

import getpass
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

RECORD = """
INSERT INTO audit_log (actor, action, org_id, details) VALUES ($1, $2, $3, $4::jsonb)
RETURNING id, at
"""
# newest first; $1 since, $2 action, $3 org, $4 limit, $5 before id (keyset)
LIST = """
SELECT id, at, actor, action, org_id, details::text AS details FROM audit_log
WHERE ($1::timestamptz IS NULL OR at >= $1) AND ($2::text IS NULL OR action = $2)
  AND ($3::uuid IS NULL OR org_id = $3) AND ($5::bigint IS NULL OR id < $5)
ORDER BY id DESC LIMIT $4
"""


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    org_id: UUID | None
    details: dict[str, Any]

    def document(self) -> dict[str, Any]:
        """As the API and `metering audit --json` show it."""
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "org_id": str(self.org_id) if self.org_id else None,
            "details": self.details,
        }


def cli_actor() -> str:
    """Who runs a command: the operating-system user, as 'cli:<user>'."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return "cli:unknown"


class AuditLog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(
        self,
        actor: str,
        action: str,
        details: dict[str, Any],
        org_id: UUID | None = None,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | None = None,
    ) -> int:
        """Append one entry (in `conn`'s transaction when given, so the entry and the
        correction it describes commit together); returns its id."""
        document = json.dumps(details, default=str)
        if conn is not None:
            row = await conn.fetchrow(RECORD, actor, action, org_id, document)
        else:
            async with self._pool.acquire() as own:
                row = await own.fetchrow(RECORD, actor, action, org_id, document)
        assert row is not None
        entry_id: int = row["id"]
        return entry_id

    async def entries(
        self,
        *,
        since: datetime | None = None,
        action: str | None = None,
        org_id: UUID | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditEntry]:
        """Entries newest first, at most `limit`, older than `before_id` when given."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(LIST, since, action, org_id, limit, before_id)
        return [
            AuditEntry(
                r["id"], r["at"], r["actor"], r["action"], r["org_id"], json.loads(r["details"])
            )
            for r in rows
        ]
