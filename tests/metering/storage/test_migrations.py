"""Migrations: applied in order, recorded, safe to re-run, edits refused."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from metering.errors import MigrationError
from metering.storage.migrations import Migration, bundled_migrations, migrate

pytestmark = pytest.mark.services


async def test_rerun_applies_nothing(db: asyncpg.Connection) -> None:
    assert await migrate(db) == []
    names = [r["name"] for r in await db.fetch("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [m.name for m in bundled_migrations()]


async def test_seed_has_exactly_the_contract_rows(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT count(*) FROM plan_features") == 36
    limits = {
        (r["plan"], r["feature_key"]): r["limit_value"]
        for r in await db.fetch("SELECT plan, feature_key, limit_value FROM plan_features")
    }
    assert limits[("free", "max_records")] == 100
    assert limits[("pro", "max_api_calls_per_month")] == 100000
    assert limits[("business", "max_ai_tokens_per_month")] == 10000000
    assert limits[("enterprise", "max_seats")] == -1
    assert all(
        limits[("enterprise", k)] == -1
        for (p, k) in limits
        if p == "enterprise" and k != "features"
    )
    flags = await db.fetchval(
        "SELECT flags FROM plan_features WHERE plan='business' AND feature_key='features'"
    )
    assert '"sso": true' in flags and '"dedicated_support": false' in flags
    assert await db.fetchval("SELECT count(*) FROM event_types") == 7


async def test_failed_migration_leaves_nothing_and_edited_one_is_refused(
    db: asyncpg.Connection,
) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    broken = Migration(f"999_{table}.sql", f"CREATE TABLE {table} (x int); SELECT 1/0;")
    with pytest.raises(MigrationError):
        await migrate(db, [broken])
    assert await db.fetchval("SELECT to_regclass($1)", table) is None
    good = Migration(f"999_{table}.sql", f"CREATE TABLE {table} (x int);")
    assert await migrate(db, [good]) == [good.name]
    edited = Migration(good.name, f"CREATE TABLE {table} (x int, y int);")
    with pytest.raises(MigrationError, match="different contents"):
        await migrate(db, [edited])
    await db.execute(f"DROP TABLE {table}")
    await db.execute("DELETE FROM schema_migrations WHERE name = $1", good.name)


async def test_the_pass_keeps_the_planner_settings_it_was_measured_with(
    db: asyncpg.Connection,
) -> None:
    """Migration 013 sets these on aggregate_new_events with ALTER FUNCTION; a later
    CREATE OR REPLACE without them would silently bring back 4 MB hash tables per grouping."""
    settings = await db.fetchval(
        "SELECT proconfig FROM pg_proc WHERE oid = 'aggregate_new_events'::regproc"
    )
    assert {"work_mem=16MB", "enable_sort=off", "enable_nestloop=off", "jit=off"} <= set(settings)
