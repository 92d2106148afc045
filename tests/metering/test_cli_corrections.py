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
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from metering.config import Settings
from metering.meters.definition import MeterSpec
from metering.meters.store import MeterStore
from metering.models import UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.conftest import ROOT, ConsumerProcess, async_wait_for, read_topic

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


async def consumed(settings: Settings, timeout: float = 60) -> int:
    """Wait until the consumer group has committed to the end of the events topic; returns
    how many messages the topic holds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    reader = AIOKafkaConsumer(
        settings.events_topic, bootstrap_servers=settings.kafka_bootstrap_servers
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await reader.start()
    await admin.start()
    try:
        partitions = [
            TopicPartition(settings.events_topic, p)
            for p in sorted(reader.partitions_for_topic(settings.events_topic) or ())
        ]
        ends = await reader.end_offsets(partitions)

        async def caught_up() -> bool:
            committed = await admin.list_consumer_group_offsets(settings.consumer_group)
            return all(tp in committed and committed[tp].offset >= end for tp, end in ends.items())

        await async_wait_for(caught_up, timeout=timeout, what="the consumer to catch up")
        return sum(ends.values())
    finally:
        await reader.stop()
        await admin.close()


def event_line(org: uuid.UUID, event_id: str, **fields: object) -> str:
    document: dict[str, object] = {
        "id": event_id,
        "type": "api_call",
        "org_id": str(org),
        "occurred_at": datetime.now(UTC).isoformat(),
    }
    document.update(fields)
    return json.dumps(document)


async def test_import_of_good_bad_and_duplicate_rows(
    settings: Settings,
    db: asyncpg.Connection,
    tmp_path: Path,
    start_consumer: Callable[..., ConsumerProcess],
) -> None:
    org = uuid.uuid4()
    now = datetime.now(UTC)
    lines = [
        event_line(org, "j1", quantity=0.1, metadata={"path": "/v1/x"}),
        event_line(org, "j2", quantity="5"),  # a numeric string is not a quantity
        event_line(org, "j3", type="api_calls"),  # no meter reads it
        "",
        "{broken",
        event_line(org, "j4", occurred_at=(now - timedelta(days=40)).isoformat()),
        event_line(org, "j1", quantity=99),  # a duplicate id: the first one counts
        # 18 significant digits, written as text: a float would round it
        event_line(org, "j5", quantity=0).replace(
            '"quantity": 0', '"quantity": 12345678901234567.5'
        ),
    ]
    jsonl = tmp_path / "usage.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    table = tmp_path / "usage.csv"
    table.write_text(
        "id,type,org_id,user_id,quantity,occurred_at,metadata\n"
        f'k1,api_call,{org},,2.50,{now.isoformat()},"{{""tier"": ""gold""}}"\n'
        f"k2,api_call,{org},,-1,{now.isoformat()},\n"
        f'"k3",api_call,{org},,,{now.isoformat()},\n'
        f"k4,api_call,{org},not-a-uuid,1,{now.isoformat()},\n"
    )
    start_consumer()
    first = run(settings, "import", str(jsonl))
    assert first.returncode == 1, first.stderr
    assert "3 events published, 4 rows rejected" in first.stderr
    rejected = [json.loads(r) for r in (tmp_path / "usage.jsonl.rejected").read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in rejected] == [
        (2, "invalid_quantity"),
        (3, "unknown_type"),
        (5, "not_json"),
        (6, "timestamp_too_old"),
    ]
    assert rejected[2]["row"] == "{broken"
    second = run(settings, "import", str(table))
    assert second.returncode == 1, second.stderr
    bad_csv = [json.loads(r) for r in (tmp_path / "usage.csv.rejected").read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in bad_csv] == [
        (3, "negative_quantity"),
        (5, "invalid_uuid"),
    ]
    assert bad_csv[0]["row"].startswith("k2,api_call,")
    await consumed(settings)
    rows = await db.fetch(
        "SELECT event_id, quantity, metadata::text AS metadata FROM usage_events "
        "WHERE org_id = $1 ORDER BY event_id",
        org,
    )
    assert [(r["event_id"], r["quantity"]) for r in rows] == [
        ("j1", Decimal("0.1")),
        ("j5", Decimal("12345678901234567.5")),
        ("k1", Decimal("2.50")),
        ("k3", Decimal(1)),
    ]
    assert json.loads(rows[2]["metadata"]) == {"tier": "gold"}
    # twice: nothing stored twice
    again = run(settings, "import", str(jsonl))
    assert again.returncode == 1 and "3 events published" in again.stderr
    await consumed(settings)
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1", org) == 4
    clean = tmp_path / "clean.jsonl"
    clean.write_text(event_line(org, "j9") + "\n")
    ok = run(settings, "import", str(clean))
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "clean.jsonl.rejected").exists()
    header = tmp_path / "typo.csv"
    header.write_text("id,type,org,occurred_at\n")
    refused = run(settings, "import", str(header))
    assert refused.returncode == 1 and "unknown: ['org']" in refused.stderr
    trail = run(settings, "audit", "--action", "import", "--json")
    assert len(trail.stdout.splitlines()) >= 4


async def test_an_interrupted_import_resumes_after_its_last_acknowledged_batch(
    settings: Settings,
    db: asyncpg.Connection,
    tmp_path: Path,
    start_consumer: Callable[..., ConsumerProcess],
) -> None:
    org = uuid.uuid4()
    total = 20_000
    big = tmp_path / "big.jsonl"
    big.write_text("".join(event_line(org, f"b{n}") + "\n" for n in range(total)))
    state = tmp_path / "big.jsonl.import-state"
    process = subprocess.Popen(
        [sys.executable, "-m", "metering", "import", str(big), "--batch-size", "500"],
        env=settings.child_environment(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def progressed() -> bool:
        saved = json.loads(state.read_text()) if state.exists() else {}
        return saved.get("rows_done", 0) >= 2_000 or process.poll() is not None

    await async_wait_for(progressed, timeout=60, what="the import to make progress")
    process.kill()  # a crash, not a polite stop
    process.wait(timeout=10)
    saved = json.loads(state.read_text())
    assert 2_000 <= saved["rows_done"] < total, "the import ended before it was killed"
    resumed = run(settings, "import", str(big), "--batch-size", "500")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after row {saved['rows_done']}" in resumed.stderr
    assert not state.exists()
    start_consumer()
    messages = await consumed(settings)
    # at most the batches in flight when it was killed were sent twice
    assert total <= messages <= total + 2 * 500
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE org_id = $1", org) == total
