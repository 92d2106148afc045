"""Request bodies -> events: plain JSON, arrays, CloudEvents; all or nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from metering.api.ingest import CLOUDEVENTS, CLOUDEVENTS_BATCH, RejectedRequest, events_from_body

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
ORG = "0b4e3e2c-5a8f-4c6b-9a2e-3f1d2c4b5a6e"
EVENT = {
    "id": "a1",
    "type": "api_call",
    "org_id": ORG,
    "quantity": 2,
    "occurred_at": "2026-11-25T11:00:00Z",
}


def parse(body: object, content_type: str = "application/json") -> list:
    return [wire.event for wire in parse_wire(body, content_type)]


def parse_wire(body: object, content_type: str = "application/json") -> list:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return events_from_body(
        raw,
        content_type,
        now=NOW,
        lateness_window=timedelta(days=35),
        future_tolerance=timedelta(minutes=5),
    )


def test_one_event_and_an_array() -> None:
    assert [e.id for e in parse(EVENT)] == ["a1"]
    assert [e.id for e in parse([EVENT, {**EVENT, "id": "a2"}])] == ["a1", "a2"]


def test_each_event_carries_its_wire_form_and_org_key() -> None:
    (wire,) = parse_wire({**EVENT, "user_id": "6F9619FF-8B86-D011-B42D-00CF4FC964FF"})
    assert wire.payload == wire.event.to_json()
    assert wire.key == ORG.lower().encode()
    published = json.loads(wire.payload)
    assert published["org_id"] == ORG.lower()
    assert published["user_id"] == "6f9619ff-8b86-d011-b42d-00cf4fc964ff"


def test_any_invalid_event_rejects_all_and_names_each_by_index() -> None:
    with pytest.raises(RejectedRequest) as caught:
        parse([EVENT, {**EVENT, "org_id": "nope"}, EVENT, {**EVENT, "quantity": -1}])
    assert caught.value.status == 422
    assert [(e.index, e.code) for e in caught.value.errors] == [
        (1, "invalid_uuid"),
        (3, "negative_quantity"),
    ]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{nope", 400, "malformed_json"),
        ([], 422, "empty_batch"),
        ([EVENT] * 1001, 413, "too_many_events"),
    ],
)
def test_request_level_errors(body: object, status: int, code: str) -> None:
    with pytest.raises(RejectedRequest) as caught:
        parse(body)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_id_is_required_over_http() -> None:
    with pytest.raises(RejectedRequest) as caught:
        parse({k: v for k, v in EVENT.items() if k != "id"})
    assert caught.value.errors[0].code == "missing_field"


def test_cloudevent_maps_onto_a_usage_event() -> None:
    cloudevent = {
        "specversion": "1.0",
        "id": "ce-1",
        "type": "com.example.ai_tokens_used",
        "source": "/chat",
        "time": "2026-11-25T11:30:00+01:00",
        "subject": ORG,
        "traceparent": "00-abc",
        "data": {"quantity": 1500, "metadata": {"model": "m1"}},
    }
    [event] = parse(cloudevent, CLOUDEVENTS)
    assert (event.id, event.type.value, str(event.org_id), event.quantity) == (
        "ce-1",
        "ai_tokens_used",
        ORG,
        Decimal(1500),
    )
    assert event.occurred_at == datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    assert event.metadata == {"model": "m1", "ce_source": "/chat", "ce_traceparent": "00-abc"}


def test_cloudevents_batch_and_its_errors() -> None:
    good = {
        "specversion": "1.0",
        "id": "c1",
        "type": "api_call",
        "source": "s",
        "time": "2026-11-25T11:00:00Z",
        "data": {"org_id": ORG},
    }
    assert len(parse([good, {**good, "id": "c2"}], CLOUDEVENTS_BATCH)) == 2
    with pytest.raises(RejectedRequest) as caught:
        parse(
            [good, {**good, "specversion": "0.3"}, {**good, "data": {"org_id": ORG, "bogus": 1}}],
            CLOUDEVENTS_BATCH,
        )
    assert [(e.index, e.code) for e in caught.value.errors] == [
        (1, "invalid_cloudevent"),
        (2, "unknown_field"),
    ]
    with pytest.raises(RejectedRequest):
        parse(good, CLOUDEVENTS_BATCH)
