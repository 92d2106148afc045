"""API keys: created once, stored only as a SHA-256 hash, compared in constant time."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from metering.storage.notifications import follow_channel

KEY_PREFIX = "mk"
INSERT_KEY = """
INSERT INTO api_keys (id, prefix, secret_hash, scopes, org_id, name)
VALUES ($1, $2, $3, $4, $5, $6)
"""
KEY_BY_PREFIX = """
SELECT id, prefix, secret_hash, scopes, org_id, name, created_at, revoked_at
FROM api_keys WHERE prefix = $1
"""
LIST_KEYS = """
SELECT id, prefix, secret_hash, scopes, org_id, name, created_at, revoked_at
FROM api_keys ORDER BY created_at
"""
REVOKE_KEY = """
UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL RETURNING id
"""


@dataclass(frozen=True)
class ApiKey:
    id: uuid.UUID
    prefix: str
    scopes: frozenset[str]
    org_id: uuid.UUID | None
    name: str
    created_at: datetime
    revoked_at: datetime | None
    # a portal token (metering/portal/tokens.py) has the one scope `portal`, one org, an
    # expiry and, optionally, the only meters it may read
    meters: frozenset[str] | None = None
    expires_at: datetime | None = None

    def allows(self, scope: str) -> bool:
        """`admin` may do everything; otherwise the scope must be granted."""
        return "admin" in self.scopes or scope in self.scopes

    def may_access(self, org_id: uuid.UUID) -> bool:
        return self.org_id is None or self.org_id == org_id

    def may_read_meter(self, meter_key: str) -> bool:
        """Whether this credential may read `meter_key` (only a portal token with a list of
        meters may not read the others)."""
        return self.meters is None or meter_key in self.meters


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _record_to_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        row["id"],
        row["prefix"],
        frozenset(row["scopes"]),
        row["org_id"],
        row["name"],
        row["created_at"],
        row["revoked_at"],
    )


# Authenticated keys are remembered this long while the process follows the revocations
# (LISTEN metering_keys, migration 019): a revoked or changed key is dropped from every API
# process's cache as the notification arrives. While that connection is down nothing is
# cached: every request reads the key.
KEY_CACHE_SECONDS = 60.0
CHANNEL = "metering_keys"


class KeyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._recent: dict[bytes, tuple[float, ApiKey]] = {}
        self._following = False
        # bumped by every notification: a key read before one is not cached after it
        self._generation = 0

    async def create(
        self, scopes: list[str], org_id: uuid.UUID | None, name: str = ""
    ) -> tuple[str, ApiKey]:
        """Create a key; return the full key (shown once, never stored) and its record."""
        prefix = secrets.token_hex(4)
        key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
        key_id = uuid.uuid4()
        async with self._pool.acquire() as conn:
            await conn.execute(INSERT_KEY, key_id, prefix, _hash(key), scopes, org_id, name)
            row = await conn.fetchrow(KEY_BY_PREFIX, prefix)
        assert row is not None
        return key, _record_to_key(row)

    async def authenticate(self, presented: str) -> ApiKey | None:
        """The live key matching `presented`, or None (unknown, malformed or revoked)."""
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            return None
        digest = _hash(presented)
        cached = self._recent.get(digest)
        if cached is not None and time.monotonic() - cached[0] < KEY_CACHE_SECONDS:
            return cached[1]
        generation = self._generation
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(KEY_BY_PREFIX, parts[1])
        if row is None or not hmac.compare_digest(row["secret_hash"], digest):
            return None
        if row["revoked_at"] is not None:
            return None
        key = _record_to_key(row)
        if self._following and generation == self._generation:
            if len(self._recent) > 10_000:
                self._recent.clear()
            self._recent[digest] = (time.monotonic(), key)
        return key

    def _changed(self, prefix: str) -> None:
        self._generation += 1
        for digest, (_, key) in list(self._recent.items()):
            if key.prefix == prefix:
                del self._recent[digest]

    async def _connected(self, _: asyncpg.Connection) -> None:
        if not self._following:  # after a gap: notifications may have been missed
            self._generation += 1
            self._recent.clear()
            self._following = True

    def _lost(self) -> None:
        self._following = False
        self._generation += 1
        self._recent.clear()

    @asynccontextmanager
    async def following_revocations(self, dsn: str) -> AsyncIterator[KeyStore]:
        """Cache authenticated keys while following their changes, until the block ends."""
        task = asyncio.create_task(
            follow_channel(
                dsn,
                CHANNEL,
                on_notify=self._changed,
                on_connected=self._connected,
                on_lost=self._lost,
            )
        )
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._lost()

    async def list(self) -> list[ApiKey]:
        async with self._pool.acquire() as conn:
            return [_record_to_key(r) for r in await conn.fetch(LIST_KEYS)]

    async def revoke(self, prefix: str) -> bool:
        async with self._pool.acquire() as conn:
            return await conn.fetchval(REVOKE_KEY, prefix) is not None
