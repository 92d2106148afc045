"""Corrections from the command line, in subprocesses as a user runs them, against the real
Kafka, PostgreSQL and consumer: `dlq list|show|replay`, `events cancel`, `audit`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from metering.config import Settings
from metering.meters.definition import MeterSpec
from metering.meters.store import MeterStore
from metering.models import UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.conftest import ROOT, ConsumerProcess, read_topic

pytestmark = pytest.mark.services


def run(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metering", *args],
        env=settings.child_environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=stdin,
        check=False,
        timeout=120,
    )


async def stored(db: asyncpg.Connection, org: uuid.UUID) -> list[str]:
    rows = await db.fetch(
        "SELECT event_id FROM usage_events WHERE org_id = $1 ORDER BY event_id", org
    )
    return [r["event_id"] for r in rows]


async def test_dead_letters_listed_shown_and_replayed_once(
    settings: Settings,
    migrated_database: str,
    db: asyncpg.Connection,
    producer: AIOKafkaProducer,
    start_consumer: Callable[..., ConsumerProcess],
) -> None:
    org = uuid.uuid4()
    kind = f"t_{uuid.uuid4().hex[:10]}"
    typo = json.dumps(
        {
            "id": "late-meter-1",
            "type": kind,
            "org_id": str(org),
            "quantity": 4,
            "occurred_at": datetime.now(UTC).isoformat(),
        }
    ).encode()
    consumer = start_consumer()
    await producer.send_and_wait(settings.events_topic, typo, key=str(org).encode())
    await producer.send_and_wait(settings.events_topic, b"{not json", key=str(org).encode())
    letters = await read_topic(settings, settings.dlq_topic, 2)
    assert len(letters) == 2

    listed = run(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert "unknown_type" in listed.stdout and "not_json" in listed.stdout
    assert str(org) in listed.stdout
    assert "2 dead letters; by code:" in listed.stderr
    only = run(settings, "dlq", "list", "--code", "not_json", "--json")
    rows = [json.loads(line) for line in only.stdout.splitlines()]
    assert [r["code"] for r in rows] == ["not_json"]
    shown = run(settings, "dlq", "show", rows[0]["position"], "--raw")
    assert shown.stdout == "{not json"
    described = run(settings, "dlq", "show", rows[0]["position"])
    assert "error.code" in described.stdout and "source.offset" in described.stdout
    missing = run(settings, "dlq", "show", "0:999999")
    assert missing.returncode == 1 and "no dead letter at 0:999999" in missing.stderr
    assert run(settings, "dlq", "show", "nonsense").returncode == 2

    dry = run(settings, "dlq", "replay", "--code", "unknown_type", "--dry-run")
    assert dry.returncode == 0 and "would replay 1 (unknown_type: 1)" in dry.stdout
    # still unknown: dead-lettered again
    again = run(settings, "dlq", "replay", "--code", "unknown_type", "--wait", "30")
    assert again.returncode == 1, again.stdout + again.stderr
    assert (
        "0 stored now" in again.stdout and "1 dead-lettered again (unknown_type: 1)" in again.stdout
    )

    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    await MeterStore(pool).create(
        MeterSpec.parse({"key": f"m_{kind[2:]}", "event_type": kind, "aggregation": "sum"})
    )
    await pool.close()
    # the consumer follows the meters (LISTEN/NOTIFY): the type is accepted now
    replayed = run(settings, "dlq", "replay", "--code", "unknown_type", "--wait", "30")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    # two dead letters of that code by now (the original and the first replay's)
    assert "replayed 2: 1 stored now, 1 stored already, 0 dead-lettered again" in replayed.stdout
    assert await stored(db, org) == ["late-meter-1"]
    twice = run(settings, "dlq", "replay", "--code", "unknown_type", "--wait", "30")
    assert "0 stored now, 2 stored already" in twice.stdout, twice.stdout
    assert await stored(db, org) == ["late-meter-1"]
    assert await db.fetchval("SELECT quantity FROM usage_events WHERE org_id = $1", org) == Decimal(
        4
    )

    trail = run(settings, "audit", "--action", "dlq.replay", "--json")
    entries = [json.loads(line) for line in trail.stdout.splitlines()]
    assert entries[0]["details"]["stored"] == 0 and entries[0]["details"]["already_stored"] == 2
    assert entries[1]["details"]["stored"] == 1
    assert entries[0]["actor"].startswith("cli:")
    assert consumer.process.poll() is None


async def test_cancel_from_the_command_line(
    settings: Settings, migrated_database: str, db: asyncpg.Connection
) -> None:
    org = uuid.uuid4()
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    now = datetime.now(UTC).replace(microsecond=0)
    await EventStore(pool).write_batch(
        [
            IncomingEvent(
                UsageEvent(
                    id=f"c{n}",
                    type="api_call",
                    org_id=org,
                    quantity=Decimal(n),
                    occurred_at=now - timedelta(hours=n),
                )
            )
            for n in range(1, 6)
        ]
    )
    await pool.close()
    by_id = run(settings, "events", "cancel", str(org), "c1", "nope", "--reason", "typo")
    assert by_id.returncode == 1  # an unknown id
    assert "cancelled" in by_id.stdout and "unknown" in by_id.stdout
    from_file = run(
        settings,
        "events",
        "cancel",
        str(org),
        "--ids-from",
        "-",
        "--reason",
        "typo",
        stdin="c1\nc2\n",
    )
    assert from_file.returncode == 0, from_file.stderr
    assert "1 cancelled, 1 already cancelled" in from_file.stderr
    window = [
        "--from",
        (now - timedelta(hours=5, minutes=30)).isoformat(),
        "--to",
        (now - timedelta(hours=2, minutes=30)).isoformat(),
    ]
    dry = run(
        settings,
        "events",
        "cancel",
        str(org),
        "--type",
        "api_call",
        *window,
        "--reason",
        "test traffic",
        "--dry-run",
    )
    assert dry.returncode == 0, dry.stderr
    assert "would cancel 3 events" in dry.stderr and "api_call" in dry.stdout
    assert (
        await db.fetchval(
            "SELECT count(*) FROM usage_events WHERE org_id = $1 AND cancelled_at IS NULL", org
        )
        == 3
    )
    done = run(
        settings,
        "events",
        "cancel",
        str(org),
        "--type",
        "api_call",
        *window,
        "--reason",
        "test traffic",
    )
    assert done.returncode == 0 and "cancelled 3 events" in done.stderr
    assert (
        await db.fetchval(
            "SELECT count(*) FROM usage_events WHERE org_id = $1 AND cancelled_at IS NULL", org
        )
        == 0
    )
    too_old = run(
        settings,
        "events",
        "cancel",
        str(org),
        "--from",
        "2020-01-01",
        "--to",
        "2020-02-01",
        "--reason",
        "x",
    )
    assert too_old.returncode == 1 and "outside the lateness window" in too_old.stderr
    assert run(settings, "events", "cancel", str(org), "--reason", "x").returncode == 2
    trail = run(settings, "audit", "--org", str(org))
    assert trail.returncode == 0
    assert trail.stdout.count("events.cancel") == 3
