"""Database roles as defence in depth (migration 014), on the real PostgreSQL: what a login
granted one of the service's roles can and cannot do by itself."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
import pytest

from consumers.app import WRITER_ROLE

pytestmark = pytest.mark.services


@pytest.fixture
async def billing_login(
    db: asyncpg.Connection, migrated_database: str
) -> AsyncIterator[asyncpg.Connection]:
    """A login of its own granted metering_reader, as an operator might give a BI tool."""
    name = f"billing_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {name} LOGIN IN ROLE metering_reader")
    parts = urlsplit(migrated_database)
    conn = await asyncpg.connect(
        parts._replace(netloc=f"{name}@{parts.hostname}:{parts.port}").geturl()
    )
    try:
        await conn.execute("SET ROLE metering_reader")
        yield conn
    finally:
        await conn.close()
        await db.execute(f"DROP OWNED BY {name}; DROP ROLE {name}")


async def _an_org_with_usage(db: asyncpg.Connection) -> uuid.UUID:
    org = uuid.uuid4()
    await db.execute("INSERT INTO org_subscriptions (org_id) VALUES ($1)", org)
    await db.execute("INSERT INTO usage_event_ids (org_id, event_id) VALUES ($1, 'e1')", org)
    await db.execute(
        "INSERT INTO usage_events (org_id, event_id, event_type, quantity, occurred_at) "
        "VALUES ($1, 'e1', 'api_call', 5, $2)",
        org,
        datetime.now(UTC),
    )
    return org


async def test_a_reader_login_cannot_scope_itself_to_another_organization(
    db: asyncpg.Connection, billing_login: asyncpg.Connection
) -> None:
    org = await _an_org_with_usage(db)
    await billing_login.execute("SELECT set_config('metering.org_id', $1, false)", str(org))
    assert await billing_login.fetchval("SELECT count(*) FROM usage_events") == 0
    assert await billing_login.fetchval("SELECT count(*) FROM org_subscriptions") == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await billing_login.fetchval(
            "SELECT reader_check_feature_access($1, 'max_api_calls_per_month', 1)", org
        )
    # the service's own session, scoped the way the API scopes a request, still sees it
    async with db.transaction():
        await db.execute("SET LOCAL ROLE metering_reader")
        await db.execute("SELECT set_config('metering.org_id', $1, true)", str(org))
        assert await db.fetchval("SELECT count(*) FROM usage_events") == 1
        other = await db.fetchval("SELECT count(*) FROM usage_events WHERE org_id <> $1", org)
        assert other == 0
    used = await db.fetchval(
        "SELECT (reader_check_feature_access($1, 'max_api_calls_per_month', 1))->>'used'", org
    )
    assert used is not None


async def test_the_writer_gives_a_new_organization_the_free_plan_and_nothing_else(
    db: asyncpg.Connection,
) -> None:
    org, greedy = uuid.uuid4(), uuid.uuid4()
    async with db.transaction():
        await db.execute(f"SET LOCAL ROLE {WRITER_ROLE}")
        await db.execute("INSERT INTO org_subscriptions (org_id) VALUES ($1)", org)
    assert await db.fetchval("SELECT plan FROM org_subscriptions WHERE org_id = $1", org) == "free"
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with db.transaction():
            await db.execute(f"SET LOCAL ROLE {WRITER_ROLE}")
            await db.execute(
                "INSERT INTO org_subscriptions (org_id, plan) VALUES ($1, 'enterprise')", greedy
            )
    assert (
        await db.fetchval("SELECT count(*) FROM org_subscriptions WHERE org_id = $1", greedy) == 0
    )


async def test_the_writer_makes_only_todays_partitions_and_a_temp_table_cannot_fool_it(
    db: asyncpg.Connection,
) -> None:
    ahead = await db.fetchval(
        "SELECT format('usage_events_%s', to_char(now() + interval '2 months', 'YYYY_MM'))"
    )
    await db.execute(f"DROP TABLE IF EXISTS {ahead}")
    async with db.transaction():
        await db.execute(f"SET LOCAL ROLE {WRITER_ROLE}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.transaction():
                await db.execute("SELECT ensure_usage_event_partitions('2000-01-01', '2090-01-01')")
        # a temporary table with the partition's name once made the function skip the month
        await db.execute(f"CREATE TEMPORARY TABLE {ahead} (x int) ON COMMIT DROP")
        assert await db.fetchval("SELECT ensure_usage_event_partitions_around_today()") >= 1
    attached = await db.fetchval(
        "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE i.inhparent = 'usage_events'::regclass AND c.relname = $1 AND n.nspname = 'public'",
        ahead,
    )
    assert attached == 1
