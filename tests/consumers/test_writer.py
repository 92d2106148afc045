"""BatchWriter on the real PostgreSQL and Kafka: what happens when the database refuses an
event that validation let through."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from consumers import writer
from consumers.dead_letters import DeadLetterPublisher
from consumers.writer import BatchWriter
from metering.config import Settings
from metering.metrics import ConsumerMetrics
from metering.models import UsageEvent
from metering.retry import KAFKA_TRANSIENT_ERRORS
from tests.conftest import read_topic
from tests.consumers.conftest import Record

pytestmark = pytest.mark.services


async def test_an_event_the_database_refuses_is_dead_lettered_alone(
    settings: Settings, migrated_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A validation gap (simulated: one event's metadata gets U+0000 after validation) must
    not block the partition: the batch's other events are stored once, that one event goes
    to the DLQ with code refused_by_database, and the outcome counts it."""
    validate = writer.parse_event

    def parse_with_a_gap(raw: bytes | None, **rules: object) -> UsageEvent:
        event = validate(raw, **rules)  # type: ignore[arg-type]
        if event.id == "slips-through":
            object.__setattr__(event, "metadata", {"note": "nul \x00"})
        return event

    monkeypatch.setattr(writer, "parse_event", parse_with_a_gap)
    org = uuid.uuid4()
    now = datetime.now(UTC)

    def message(event_id: str, quantity: int = 1) -> bytes:
        return json.dumps(
            {
                "id": event_id,
                "type": "api_call",
                "org_id": str(org),
                "quantity": quantity,
                "occurred_at": (now - timedelta(seconds=1)).isoformat(),
            }
        ).encode()

    values = [message(f"good-{n}") for n in range(6)]
    values.insert(2, message("slips-through"))
    values.append(b"not json")
    values.append(message("good-1", 7))  # a duplicate
    records = [
        Record(settings.events_topic, 3, 100 + n, str(org).encode(), value)
        for n, value in enumerate(values)
    ]

    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    assert pool is not None
    dead_letters = DeadLetterPublisher(settings)
    await dead_letters.start()
    registry = CollectorRegistry()
    try:
        batch_writer = BatchWriter(
            settings,
            writer.EventStore(pool),
            dead_letters,
            ConsumerMetrics(registry),
            KAFKA_TRANSIENT_ERRORS,
        )
        outcome = await batch_writer.process(records)
        rows = await pool.fetch(
            "SELECT event_id, quantity FROM usage_events WHERE org_id = $1 ORDER BY event_id", org
        )
    finally:
        await dead_letters.stop()
        await pool.close()

    assert (outcome.consumed, outcome.stored, outcome.duplicates, outcome.dead_lettered) == (
        9,
        6,
        1,
        2,
    )
    assert [(r["event_id"], r["quantity"]) for r in rows] == [(f"good-{n}", 1) for n in range(6)]
    letters = await read_topic(settings, settings.dlq_topic, expected=2)
    codes = {letter.value: dict(letter.headers)["error.code"].decode() for letter in letters}
    assert codes == {values[2]: "refused_by_database", b"not json": "not_json"}
    refused = next(letter for letter in letters if letter.value == values[2])
    headers = {name: value.decode() for name, value in refused.headers}
    assert "22P05" in headers["error.reason"]
    assert headers["source.offset"] == "102"
    assert (
        registry.get_sample_value(
            "metering_events_dead_lettered_total", {"reason": "refused_by_database"}
        )
        == 1
    )
