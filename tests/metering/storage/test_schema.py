"""The schema's two paths end in the same database (issue 36): built from scratch, or
upgraded from the v0.1 release (migrations 001-013) with data in it, on the real PostgreSQL.
And every function has one current definition, in one file of metering/schema/ or
aggregator/schema/."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit

import asyncpg
import pytest

from aggregator.limits import LimitUsage
from aggregator.service import decide_crossings
from aggregator.store import (
    FINISH_PASS,
    SNAPSHOT_AND_LOCK,
    AggregateStore,
    crossing_columns,
    notified_set,
)
from metering.config import Settings
from metering.models import EventType, UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from metering.storage.migrations import bundled_definitions, bundled_migrations, migrate

pytestmark = pytest.mark.services

V0_1_LAST_MIGRATION = "013_pass_hash_tables_sized_small.sql"
# What "the same database" means here: every part of the catalog a migration can touch.
CATALOG = {
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type, is_nullable,
               column_default
        FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 3""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' ORDER BY 1, 2""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "functions": """
        SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid), p.proacl::text
        FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
    "policies": """
        SELECT tablename, policyname, roles::text, cmd, qual, with_check
        FROM pg_policies WHERE schemaname = 'public' ORDER BY 1, 2""",
    "relations": """
        SELECT relname, relkind, relrowsecurity, relacl::text,
               array_to_string(reloptions, ',')
        FROM pg_class WHERE relnamespace = 'public'::regnamespace ORDER BY 1""",
    "column_grants": """
        SELECT table_name, column_name, grantee, privilege_type
        FROM information_schema.column_privileges
        WHERE table_schema = 'public' AND grantee LIKE 'metering%' ORDER BY 1, 2, 3, 4""",
}
DATA_TABLES = [
    "usage_events",
    "usage_event_ids",
    "usage_aggregations",
    "usage_period_users",
    "org_subscriptions",
    "limit_notifications",
    "aggregation_passes",
    "plan_features",
    "api_keys",
]


async def catalog(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {part: [tuple(row) for row in await conn.fetch(sql)] for part, sql in CATALOG.items()}


@pytest.fixture
async def two_databases(
    migrated_database: str, db: asyncpg.Connection
) -> AsyncIterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    names = (f"schema_fresh_{suffix}", f"schema_upgraded_{suffix}")
    for name in names:
        await db.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(migrated_database)
    yield tuple(parts._replace(path=f"/{name}").geturl() for name in names)  # type: ignore[misc]
    for name in names:
        await db.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def _use_like_v0_1(dsn: str, settings: Settings) -> None:
    """Traffic of the v0.1 release: events of two orgs (one in Berlin) over two days, users,
    a gauge, a free org past its limit; aggregated by passes, with crossings recorded."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        now = datetime.now(UTC)
        free, berlin = uuid.uuid4(), uuid.uuid4()
        await pool.execute(
            "INSERT INTO org_subscriptions (org_id, plan, timezone) VALUES "
            "($1, 'free', 'UTC'), ($2, 'pro', 'Europe/Berlin')",
            free,
            berlin,
        )
        events = []
        for n in range(60):
            kind = [EventType.API_CALL, EventType.USER_ACTIVE, EventType.STORAGE_USED][n % 3]
            events.append(
                IncomingEvent(
                    UsageEvent(
                        id=f"v01-{n}",
                        type=kind,
                        org_id=free if n % 2 else berlin,
                        user_id=uuid.uuid4() if kind is EventType.USER_ACTIVE else None,
                        quantity=Decimal(100 + 10 * n),
                        occurred_at=now - timedelta(hours=n),
                    )
                )
            )
        await EventStore(pool).write_batch(events)
        await _v0_1_pass(pool)
    finally:
        await pool.close()


async def _v0_1_pass(pool: asyncpg.Pool) -> None:
    """A pass as v0.1's aggregator ran it: its aggregation_pass took the thresholds (80,
    100) and marked those recorded in a bit mask over them; today's reads each limit's own
    (migration 020), so today's AggregateStore cannot run on v0.1's schema."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        bounds = await conn.fetchrow(SNAPSHOT_AND_LOCK, None)
        assert bounds is not None
        lower, upper = bounds["lower"], bounds["upper"]
        applied = await conn.fetchrow(
            "SELECT * FROM aggregation_pass($1, $2, $3)", lower, upper, [80, 100]
        )
        assert applied is not None
        usages = [
            LimitUsage(org, feature, period, start, Decimal(used), limit, notified_set(mask))
            for org, feature, period, start, used, limit, mask in zip(
                applied["limit_orgs"],
                applied["limit_features"],
                applied["limit_periods"],
                applied["limit_starts"],
                applied["limit_used"],
                applied["limit_values"],
                applied["limit_notified"],
                strict=True,
            )
        ]
        found = decide_crossings(usages)
        await conn.fetch(FINISH_PASS, lower, upper, applied["events"], *crossing_columns(found))


async def test_built_from_scratch_and_upgraded_from_v0_1_are_the_same_database(
    two_databases: tuple[str, str], settings: Settings
) -> None:
    fresh_dsn, upgraded_dsn = two_databases
    fresh = await asyncpg.connect(fresh_dsn)
    upgraded = await asyncpg.connect(upgraded_dsn)
    try:
        await migrate(fresh)
        v0_1 = [m for m in bundled_migrations() if m.name <= V0_1_LAST_MIGRATION]
        assert [m.name for m in v0_1][-1] == V0_1_LAST_MIGRATION
        await migrate(upgraded, v0_1)  # the release: versioned files only, no definitions
        await _use_like_v0_1(upgraded_dsn, settings)
        before = {t: await upgraded.fetchval(f"SELECT count(*) FROM {t}") for t in DATA_TABLES}
        assert before["usage_aggregations"] > 0 and before["limit_notifications"] > 0

        applied = await migrate(upgraded)

        assert applied[: -len(bundled_definitions())] == [
            m.name for m in bundled_migrations() if m.name > V0_1_LAST_MIGRATION
        ]
        assert await catalog(upgraded) == await catalog(fresh)
        after = {t: await upgraded.fetchval(f"SELECT count(*) FROM {t}") for t in DATA_TABLES}
        assert after == before
        pool = await asyncpg.create_pool(upgraded_dsn, min_size=1, max_size=1)
        assert pool is not None
        try:
            today = datetime.now(UTC).date()
            differences = await AggregateStore(pool).reconcile(
                today - timedelta(days=40), today + timedelta(days=2)
            )
        finally:
            await pool.close()
        assert differences == []
        assert await migrate(upgraded) == []  # and nothing left to do
    finally:
        await fresh.close()
        await upgraded.close()


async def test_every_function_has_one_current_definition_in_one_file(
    db: asyncpg.Connection,
) -> None:
    """A reader finds a function's live body in a schema/ folder, once, without replaying
    migrations; and what runs is that text."""
    defined: dict[str, list[str]] = {}
    for definition in bundled_definitions():
        for name in re.findall(
            r"CREATE OR REPLACE FUNCTION public\.(\w+)\(", definition.sql, flags=re.IGNORECASE
        ):
            defined.setdefault(name, []).append(definition.name)
    live = await db.fetch(
        "SELECT p.proname, count(*) AS overloads, array_agg(pg_get_functiondef(p.oid)) AS texts "
        "FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace GROUP BY 1"
    )
    everything = "\n".join(d.sql for d in bundled_definitions())
    # generated by its file at migrate time, with the owner's name in it (see 50_limits.sql)
    generated = {"metering_scoped_org"}
    for row in live:
        files = set(defined.get(row["proname"], []))
        assert len(files) == 1, (row["proname"], files)
        assert len(defined[row["proname"]]) == row["overloads"]
        if row["proname"] in generated:
            continue
        for text in row["texts"]:
            assert text.strip() in everything, f"{row['proname']}: live body differs from its file"
