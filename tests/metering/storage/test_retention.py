"""Retention drops whole old partitions and their dedupe keys, nothing newer, and blocks
re-aggregating what it dropped."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import UTC, date, datetime

import asyncpg
import pytest

from metering.config import Settings
from metering.storage.retention import apply_retention, raw_events_from
from tests.conftest import ROOT, settings_env

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
        planned = await apply_retention(pool, keep_from, dry_run=True)
        assert [r["partition_name"] for r in planned] == [
            "usage_events_2019_01",
            "usage_events_2019_02",
        ]
        assert await db.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1", org) == 3
        dropped = await apply_retention(pool, keep_from, dry_run=False)
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
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 1 and "dropped by retention" in refused.stderr
