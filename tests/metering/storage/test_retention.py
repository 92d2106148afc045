"""Retention drops whole old partitions and their dedupe keys, nothing newer, and blocks
re-aggregating what it dropped."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from metering.config import Settings
from metering.errors import RetentionTooShort
from metering.storage.retention import apply_retention, raw_events_from
from tests.conftest import ROOT

pytestmark = pytest.mark.services


async def test_retention_drops_old_partitions_and_keys_only(
    settings: Settings, db: asyncpg.Connection, migrated_database: str
) -> None:
    await db.execute("SELECT ensure_usage_event_partitions('2019-01-01', '2019-03-01')")
    org = uuid.uuid4()
    for n, (month, seen) in enumerate(
        [("2019-01-15", "2019-01-15"), ("2019-02-15", "2019-02-15"), ("2019-03-15", "2019-03-15")]
    ):
        await db.execute(
            "INSERT INTO usage_events (org_id, event_id, event_type, quantity, occurred_at) "
            "VALUES ($1, $2, 'api_call', 1, $3)",
            org,
            f"old{n}",
            datetime.fromisoformat(month + "T00:00:00+00:00"),
        )
        await db.execute(
            "INSERT INTO usage_event_ids (org_id, event_id, first_seen_at) VALUES ($1, $2, $3)",
            org,
            f"old{n}",
            datetime.fromisoformat(seen + "T00:00:05+00:00"),
        )
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    try:
        keep_from = datetime(2019, 3, 10, tzinfo=UTC)  # inside March: March is kept whole
        rules = {"now": datetime.now(UTC), "lateness_window": timedelta(days=35)}
        planned = await apply_retention(pool, keep_from, dry_run=True, **rules)
        assert [r["partition_name"] for r in planned] == [
            "usage_events_2019_01",
            "usage_events_2019_02",
        ]
        assert await db.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1", org) == 3
        dropped = await apply_retention(pool, keep_from, dry_run=False, **rules)
        assert [(r["partition_name"], r["events"]) for r in dropped] == [
            ("usage_events_2019_01", 1),
            ("usage_events_2019_02", 1),
        ]
        assert [
            r["event_id"]
            for r in await db.fetch("SELECT event_id FROM usage_events WHERE org_id = $1", org)
        ] == ["old2"]
        assert sorted(
            r["event_id"]
            for r in await db.fetch("SELECT event_id FROM usage_event_ids WHERE org_id = $1", org)
        ) == ["old2"]
        assert await db.fetchval("SELECT to_regclass('usage_events_2019_03')") is not None
        horizon = await raw_events_from(pool)
        assert horizon is not None and horizon.date() >= date(2019, 3, 1)
    finally:
        await pool.close()

    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "metering",
            "reaggregate",
            "--from",
            "2019-01-01",
            "--to",
            "2019-04-01",
        ],
        env=settings.child_environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 1 and "dropped by retention" in refused.stderr


async def test_a_horizon_inside_the_lateness_window_is_refused(
    settings: Settings, db: asyncpg.Connection, migrated_database: str
) -> None:
    """Dropping the keys of events that are still accepted would let a re-sent copy be
    counted twice: refused before anything is dropped, by the function and by the CLI."""
    org = uuid.uuid4()
    ten_days_ago = datetime.now(UTC) - timedelta(days=10)
    await db.execute(
        "INSERT INTO usage_events (org_id, event_id, event_type, quantity, occurred_at) "
        "VALUES ($1, 'recent', 'api_call', 1, $2)",
        org,
        ten_days_ago,
    )
    await db.execute(
        "INSERT INTO usage_event_ids (org_id, event_id, first_seen_at) VALUES ($1, 'recent', $2)",
        org,
        ten_days_ago,
    )
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=1)
    try:
        with pytest.raises(RetentionTooShort) as caught:
            await apply_retention(
                pool,
                datetime.now(UTC) - timedelta(days=5),
                dry_run=False,
                now=datetime.now(UTC),
                lateness_window=timedelta(days=35),
            )
    finally:
        await pool.close()
    assert "counted twice" in caught.value.reason
    cli = subprocess.run(
        [sys.executable, "-m", "metering", "retention", "--keep", "7d"],
        env=settings.child_environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode == 2 and "lateness window" in cli.stderr, cli.stderr
    assert await db.fetchval("SELECT count(*) FROM usage_event_ids WHERE org_id = $1", org) == 1
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1", org) == 1
