"""Pure parts of the write path: per-event failures stay per event, dead letters are logged
as counts. No services: records and clocks are plain objects here."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest

from consumers import writer
from consumers.dead_letters import DeadLetter, DeadLetterLog
from consumers.writer import UNPROCESSABLE, split_batch
from metering.config import Settings
from metering.models import timestamp_ms
from tests.consumers.conftest import Record


def message(event_id: str, **metadata: object) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "type": "api_call",
            "org_id": "00000000-0000-4000-8000-000000000001",
            "occurred_at": datetime.now(UTC).isoformat(),
            "metadata": metadata,
        }
    ).encode()


def test_an_error_preparing_one_event_dead_letters_that_event_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever fails for one event outside the rules (here: making its row, the failure of
    1e5000 in metadata) must not fail the batch; that event becomes `unprocessable`."""
    real = writer.IncomingEvent

    class Exploding(real):  # type: ignore[misc, valid-type]
        def __post_init__(self) -> None:
            if self.event.id == "boom":
                raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
            super().__post_init__()

    monkeypatch.setattr(writer, "IncomingEvent", Exploding)
    now = timestamp_ms(datetime.now(UTC))
    records = [
        Record("t", 0, n, b"k", message(name), now)
        for n, name in enumerate(["a", "boom", "b", "c"])
    ]
    valid, invalid = split_batch(records, Settings())
    assert [item.event.id for item in valid] == ["a", "b", "c"]
    assert [(letter.offset, letter.code) for letter in invalid] == [(1, UNPROCESSABLE)]
    assert "ValueError" in invalid[0].reason and "replay" in invalid[0].reason


def letter(code: str, offset: int) -> DeadLetter:
    return DeadLetter(b"x", b"k", code, f"reason {offset}", "usage.events", 2, offset)


def test_dead_letters_are_logged_as_counts_per_interval() -> None:
    now = [100.0]
    logger = logging.getLogger("test.dead_letters")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    log = DeadLetterLog(interval=10, clock=lambda: now[0], logger=logger)
    log.record([letter("not_json", 1), letter("not_json", 2)])
    log.record([letter("too_large", n) for n in range(3, 1000)])
    assert len(records) == 1 and "usage.events[2]@1: not_json" in records[0]
    now[0] = 111.0
    log.record([letter("not_json", 1000)])  # after the interval: the summary, then this one
    assert len(records) == 3
    assert "998 more messages" in records[1]
    assert "too_large 997, not_json 1" in records[1]
    assert "usage.events[2]@1000" in records[2]
    log.flush()  # nothing counted since: nothing written
    assert len(records) == 3
