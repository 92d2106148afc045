"""Portal tokens (contract section 11): short-lived credentials that read one organization,
and only the listed meters when a list is given, for a browser or an app's backend.

A token is `mp_<prefix>_<secret>`, stored like an API key (only a SHA-256 hash of it). It
has the single scope `portal`: every route that does not name that scope refuses it (403),
the write routes included. It cannot be revoked other than by its expiry (at most 24 hours,
default 1 hour): what it reads is what the organization's own read key reads, and the app
that handed it out can hand out a shorter one; a table row per token keeps that open.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from metering.errors import MeteringError
from metering.meters.store import Meter
from metering.storage.audit import AuditLog
from metering.storage.keys import ApiKey

TOKEN_PREFIX = "mp"
PORTAL_SCOPE = "portal"
DEFAULT_LIFETIME = timedelta(hours=1)
MIN_LIFETIME = timedelta(minutes=1)
MAX_LIFETIME = timedelta(hours=24)
MAX_METERS = 100

INSERT_TOKEN = """
INSERT INTO portal_tokens (id, prefix, secret_hash, org_id, meters, expires_at, created_by)
VALUES ($1, $2, $3, $4, $5, now() + $6::interval, $7)
RETURNING created_at, expires_at
"""
# tokens a day past their expiry are of no use to anyone: dropped as new ones are made
DROP_EXPIRED = "DELETE FROM portal_tokens WHERE expires_at < now() - interval '1 day'"
TOKEN_BY_PREFIX = """
SELECT id, prefix, secret_hash, org_id, meters, expires_at, created_at, now() AS now
FROM portal_tokens WHERE prefix = $1
"""
UNKNOWN_METERS = """
SELECT array_agg(wanted ORDER BY wanted) FROM unnest($1::text[]) AS wanted
WHERE NOT EXISTS (SELECT 1 FROM meters WHERE key = wanted AND status <> 'archived')
"""


def hidden_limits(key: ApiKey, meters: Iterable[Meter]) -> frozenset[str]:
    """The limits `key` may not see: those counted by a meter it may not read (only a
    portal token with a list of meters has any)."""
    return frozenset(
        m.row["limit_key"]
        for m in meters
        if m.row["limit_key"] is not None and not key.may_read_meter(m.key)
    )


class InvalidPortalToken(MeteringError):
    """A portal token request broke a rule: `field` names it, `reason` says how to fix it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ExpiredPortalToken(MeteringError):
    """The token was valid until `expires_at`; the app that handed it out makes a new one."""

    def __init__(self, expires_at: datetime) -> None:
        super().__init__(f"the portal token expired at {expires_at.isoformat()}")
        self.expires_at = expires_at


def lifetime_of(expires_in: int | None) -> timedelta:
    """The token's lifetime from `expires_in` seconds (default 1 h); InvalidPortalToken
    outside 60 s .. 24 h."""
    if expires_in is None:
        return DEFAULT_LIFETIME
    if not MIN_LIFETIME.total_seconds() <= expires_in <= MAX_LIFETIME.total_seconds():
        raise InvalidPortalToken(
            "expires_in", "seconds between 60 and 86400 (24 hours); default 3600"
        )
    return timedelta(seconds=expires_in)


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once, never stored
    credential: ApiKey


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class PortalTokenStore:
    def __init__(self, pool: asyncpg.Pool, audit: AuditLog) -> None:
        self._pool = pool
        self._audit = audit
        # a token never changes until it expires: remembered (by hash) until then
        self._known: dict[bytes, ApiKey] = {}

    async def issue(
        self,
        org_id: uuid.UUID,
        meters: list[str] | None,
        lifetime: timedelta,
        created_by: str,
    ) -> IssuedToken:
        """A new token for `org_id`, audited as `portal_token.created` (prefix, meters,
        expiry) in the same transaction. InvalidPortalToken when a listed meter does not
        exist (or is archived), or the list is empty or too long."""
        if meters is not None:
            if not meters or len(meters) > MAX_METERS:
                raise InvalidPortalToken(
                    "meters", f"1 to {MAX_METERS} meter keys, or leave it out for every meter"
                )
            meters = sorted(set(meters))
        prefix = secrets.token_hex(4)
        token = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
        token_id = uuid.uuid4()
        async with self._pool.acquire() as conn, conn.transaction():
            if meters is not None:
                unknown = await conn.fetchval(UNKNOWN_METERS, meters)
                if unknown:
                    raise InvalidPortalToken(
                        "meters", f"no active meter {', '.join(map(repr, unknown))}"
                    )
            await conn.execute(DROP_EXPIRED)
            row = await conn.fetchrow(
                INSERT_TOKEN,
                token_id,
                prefix,
                _hash(token),
                org_id,
                meters,
                lifetime,
                created_by,
            )
            assert row is not None
            await self._audit.record(
                created_by,
                "portal_token.created",
                {"prefix": prefix, "meters": meters, "expires_at": row["expires_at"].isoformat()},
                org_id=org_id,
                conn=conn,
            )
        credential = ApiKey(
            token_id,
            prefix,
            frozenset({PORTAL_SCOPE}),
            org_id,
            "portal token",
            row["created_at"],
            None,
            meters=None if meters is None else frozenset(meters),
            expires_at=row["expires_at"],
        )
        return IssuedToken(token, credential)

    async def authenticate(self, presented: str) -> ApiKey | None:
        """The credential of a live token, None for an unknown or malformed one; raises
        ExpiredPortalToken for one that expired (the caller says so: a page can tell its
        user to ask for a new one)."""
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            return None
        digest = _hash(presented)
        known = self._known.get(digest)
        if known is not None:
            assert known.expires_at is not None
            if known.expires_at.timestamp() > time.time():
                return known
            raise ExpiredPortalToken(known.expires_at)
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(TOKEN_BY_PREFIX, parts[1])
        if row is None or not hmac.compare_digest(row["secret_hash"], digest):
            return None
        if row["expires_at"] <= row["now"]:
            raise ExpiredPortalToken(row["expires_at"])
        credential = ApiKey(
            row["id"],
            row["prefix"],
            frozenset({PORTAL_SCOPE}),
            row["org_id"],
            "portal token",
            row["created_at"],
            None,
            meters=None if row["meters"] is None else frozenset(row["meters"]),
            expires_at=row["expires_at"],
        )
        if len(self._known) > 10_000:
            self._known.clear()
        self._known[digest] = credential
        return credential
