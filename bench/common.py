"""Shared set-up for benchmarks: a fresh migrated database and topics of their own."""

from __future__ import annotations

import asyncio
import json
import platform
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import psutil
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from pydantic import SecretStr

from metering.config import Settings
from metering.devenv.services import DevServices
from metering.topics import TopicSpec, delete_topics_with_prefix, ensure_topics

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"{platform.platform()}"
    )


async def fresh_environment(database: str, partitions: int = 6) -> Settings:
    """Start the dev services if needed, recreate `database`, migrate it, make topics."""
    defaults = Settings()
    dsn = defaults.database_url.get_secret_value().rsplit("/", 1)[0] + f"/{database}"
    suffix = uuid.uuid4().hex[:8]
    settings = defaults.model_copy(
        update={
            "database_url": SecretStr(dsn),
            "dev_dir": ROOT / ".dev",
            "events_topic": f"bench.events.{suffix}",
            "dlq_topic": f"bench.dlq.{suffix}",
            "limits_topic": f"bench.limits.{suffix}",
            "consumer_group": f"bench-{suffix}",
        }
    )
    services = DevServices(settings)
    await asyncio.to_thread(services.start_postgres)
    await asyncio.to_thread(services.start_kafka)
    await services.recreate_database()
    await delete_topics_with_prefix(settings, "bench.")  # earlier runs'
    await ensure_topics(
        settings,
        [
            TopicSpec(settings.events_topic, partitions, {}),
            TopicSpec(settings.dlq_topic, 1, {}),
            TopicSpec(settings.limits_topic, 1, {}),
        ],
    )
    # Start measuring from a clean checkpoint: the previous run's dirty pages (and the
    # dropped database's) are written now, not by the checkpointer during the measurement.
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return settings


def synthetic_events(
    count: int,
    orgs: int,
    duplicate_rate: float,
    seed: int = 1,
    spread: timedelta = timedelta(days=20),
) -> tuple[list[tuple[bytes, bytes]], int]:
    """(key, value) pairs of `count` valid events; returns them and the distinct count."""
    rng = random.Random(seed)
    org_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(orgs)]
    users = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(500)]
    now = datetime.now(UTC)
    spread_s = int(spread.total_seconds())
    types = ["api_call", "record_created", "automation_run", "schedule_executed", "ai_tokens_used"]
    messages: list[tuple[bytes, bytes]] = []
    distinct = 0
    for n in range(count):
        if messages and rng.random() < duplicate_rate:
            messages.append(messages[rng.randrange(len(messages))])
            continue
        distinct += 1
        org = org_ids[rng.randrange(orgs)]
        when = (now - timedelta(seconds=rng.randrange(spread_s))).isoformat()
        kind = rng.random()
        if kind < 0.05:
            body = (
                f'{{"id":"b{seed}-{n}","type":"user_active","org_id":"{org}",'
                f'"user_id":"{users[rng.randrange(500)]}","occurred_at":"{when}"}}'
            )
        elif kind < 0.1:
            body = (
                f'{{"id":"b{seed}-{n}","type":"storage_used","org_id":"{org}",'
                f'"quantity":{rng.randrange(10**9)},"occurred_at":"{when}"}}'
            )
        else:
            body = (
                f'{{"id":"b{seed}-{n}","type":"{types[rng.randrange(5)]}","org_id":"{org}",'
                f'"quantity":{rng.randint(1, 50)},"occurred_at":"{when}"}}'
            )
        messages.append((org.encode(), body.encode()))
    return messages, distinct


async def publish_fast(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    """Publish with per-partition record batches (much faster than send() per message)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        max_batch_size=1024 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(settings.events_topic))
        partitioner = DefaultPartitioner()
        batches = {p: producer.create_batch() for p in partitions}
        pending = []
        for key, value in messages:
            partition = partitioner(key, partitions, partitions)
            batch = batches[partition]
            if batch.append(key=key, value=value, timestamp=None) is None:
                pending.append(
                    await producer.send_batch(batch, settings.events_topic, partition=partition)
                )
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in batches.items():
            if batch.record_count():
                pending.append(
                    await producer.send_batch(batch, settings.events_topic, partition=partition)
                )
        for future in pending:
            await future
    finally:
        await producer.stop()


def start_metering(settings: Settings, *args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "metering", *args],
        env=settings.child_environment(),
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


RESULTS = Path(__file__).with_name("results.jsonl")


def record_result(bench: str, command: str, figures: dict[str, object]) -> None:
    """Append one run's figures to bench/results.jsonl (the series BENCHMARKS.md quotes)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    with RESULTS.open("a") as results:
        results.write(
            json.dumps(
                {
                    "bench": bench,
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "commit": commit,
                    "machine": machine(),
                    "command": command,
                    **figures,
                }
            )
            + "\n"
        )
