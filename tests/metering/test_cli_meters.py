"""`metering meters create|list|show|archive` and `metering usage ORG --meter` against the
real PostgreSQL, in subprocesses as a user would run them."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from metering.config import Settings
from metering.metrics import AggregatorMetrics
from metering.models import UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.metering.test_cli import metering

pytestmark = pytest.mark.services


async def test_meters_from_the_command_line(settings: Settings, migrated_database: str) -> None:
    kind = f"t_{uuid.uuid4().hex[:10]}"
    key = f"c_{kind[2:]}"
    created = metering(
        migrated_database,
        "meters",
        "create",
        key,
        "--event-type",
        kind,
        "--aggregation",
        "sum",
        "--value",
        "metadata.tokens",
        "--filter",
        "env=prod,staging",
        "--group-by",
        "model",
        "--description",
        "tokens by model",
    )
    assert created.returncode == 0, created.stderr
    assert f"created meter {key} (backfilling)" in created.stdout
    bad = metering(
        migrated_database,
        "meters",
        "create",
        "x_y",
        "--event-type",
        kind,
        "--aggregation",
        "sum",
        "--group-by",
        "a..b",
    )
    assert bad.returncode == 1 and "group_by" in bad.stderr
    shown = json.loads(metering(migrated_database, "meters", "show", key).stdout)
    assert shown["filter"] == {"env": ["prod", "staging"]}
    assert shown["group_by"] == ["model"]
    assert metering(migrated_database, "meters", "show", "no_such").returncode == 2

    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    assert pool is not None
    org = uuid.uuid4()
    now = datetime.now(UTC)
    try:
        await EventStore(pool).write_batch(
            [
                IncomingEvent(
                    UsageEvent(
                        id=f"e{n}",
                        type=kind,
                        org_id=org,
                        occurred_at=now - timedelta(hours=n),
                        metadata={"env": "prod", "model": f"m{n % 2}", "tokens": n},
                    )
                )
                for n in range(10)
            ]
        )
        aggregator = Aggregator(
            settings, AggregateStore(pool), None, AggregatorMetrics(CollectorRegistry())
        )
        for _ in range(100):
            result = await aggregator.run_once(publish=False)
            if result.events == 0 and not aggregator.backfilling:
                break
    finally:
        await pool.close()
    listed = metering(migrated_database, "meters", "list")
    assert key in listed.stdout and "active" in listed.stdout.split(key)[1].splitlines()[0]
    as_csv = metering(
        migrated_database,
        "usage",
        str(org),
        "--meter",
        key,
        "--window",
        "month",
        "--csv",
        "--from",
        (now - timedelta(days=40)).date().isoformat(),
        "--to",
        (now + timedelta(days=40)).date().isoformat(),
    )
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    by_model: dict[str, Decimal] = {}
    for row in rows:
        model = json.loads(row["dimensions"])["model"]
        by_model[model] = by_model.get(model, Decimal(0)) + Decimal(row["value"])
    assert by_model == {"m0": Decimal(0 + 2 + 4 + 6 + 8), "m1": Decimal(1 + 3 + 5 + 7 + 9)}
    refused = metering(migrated_database, "usage", str(org), "--meter", key, "--group-by", "x")
    assert refused.returncode == 1 and "no dimension 'x'" in refused.stderr
    archived = metering(migrated_database, "meters", "archive", key)
    assert archived.returncode == 0 and "archived" in archived.stdout
    seeded = metering(migrated_database, "meters", "archive", "api_call")
    assert seeded.returncode == 1 and "seeded" in seeded.stderr
