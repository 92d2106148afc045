"""Helpers for publishing known streams of events and checking the table is exact."""

from __future__ import annotations

import json
import random
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from metering.config import Settings


@dataclass(frozen=True)
class Record:
    """The parts of a Kafka record the batch writer reads (consumers.writer.KafkaRecord)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None


@dataclass
class PublishedStream:
    """What a test published: the distinct valid keys it expects to find stored."""

    orgs: list[uuid.UUID]
    expected_keys: set[tuple[uuid.UUID, str]] = field(default_factory=set)
    messages: int = 0


async def publish_stream(
    producer: AIOKafkaProducer,
    settings: Settings,
    *,
    events: int,
    orgs: int = 50,
    duplicate_rate: float = 0.05,
    seed: int = 7,
) -> PublishedStream:
    """Publish `events` valid messages, about `duplicate_rate` of them re-sends of an earlier
    id (with another quantity and time, which must not matter), keyed by org_id."""
    rng = random.Random(seed)
    stream = PublishedStream(
        orgs=[uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(orgs)]
    )
    sent: list[tuple[uuid.UUID, str]] = []
    now = datetime.now(UTC)
    futures = []
    for n in range(events):
        if sent and rng.random() < duplicate_rate:
            org, event_id = rng.choice(sent)
        else:
            org, event_id = rng.choice(stream.orgs), f"e-{seed}-{n}"
            sent.append((org, event_id))
        stream.expected_keys.add((org, event_id))
        body = {
            "id": event_id,
            "type": "api_call",
            "org_id": str(org),
            "quantity": rng.randint(1, 9),
            "occurred_at": (now - timedelta(seconds=rng.randint(0, 3 * 86400))).isoformat(),
        }
        futures.append(
            await producer.send(
                settings.events_topic, json.dumps(body).encode(), key=str(org).encode()
            )
        )
        stream.messages += 1
    await producer.flush()
    for future in futures:
        await future
    return stream


async def stored_keys(dsn: str, orgs: list[uuid.UUID]) -> list[tuple[uuid.UUID, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT org_id, event_id FROM usage_events WHERE org_id = ANY($1::uuid[])", orgs
        )
    finally:
        await conn.close()
    return [(r["org_id"], r["event_id"]) for r in rows]


async def stored_count(dsn: str, orgs: list[uuid.UUID]) -> int:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError):
        return -1
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM usage_events WHERE org_id = ANY($1::uuid[])", orgs
        )
        return count
    except (OSError, asyncpg.PostgresError):
        return -1
    finally:
        await conn.close()


def assert_exact(keys: list[tuple[uuid.UUID, str]], stream: PublishedStream) -> None:
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} events stored twice"
    missing = stream.expected_keys - set(keys)
    extra = set(keys) - stream.expected_keys
    assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} unexpected events stored"


@pytest.fixture
def small_batches(settings: Settings) -> Settings:
    """Small batches make a consumer take seconds over a stream, so it can be hit mid-way."""
    return settings.model_copy(update={"consumer_batch_size": 100})


def scrape(port: int) -> dict[str, float]:
    """The samples a process serves on /metrics, by name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
