"""Validation of contract section 1: each rule rejected with its own code, no crash ever."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.errors import InvalidEvent
from metering.models import MAX_EVENT_BYTES, EventType, UsageEvent, parse_event

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=35)
ORG = "0b4e3e2c-5a8f-4c6b-9a2e-3f1d2c4b5a6e"


def event(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": "evt-1",
        "type": "api_call",
        "org_id": ORG,
        "quantity": 3,
        "occurred_at": "2026-03-15T11:00:00Z",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()


def parse(raw: bytes) -> UsageEvent:
    return parse_event(raw, now=NOW, lateness_window=WINDOW)


def code_of(raw: bytes) -> str:
    with pytest.raises(InvalidEvent) as caught:
        parse(raw)
    return caught.value.code


def test_valid_event_parses_with_exact_values() -> None:
    parsed = parse(json.dumps(event(quantity=0.1, metadata={"path": "/x"})).encode())
    assert parsed.quantity == Decimal("0.1")
    assert parsed.org_id == UUID(ORG)
    assert parsed.type is EventType.API_CALL
    assert parsed.occurred_at == datetime(2026, 3, 15, 11, tzinfo=UTC)
    assert parsed.metadata == {"path": "/x"}


def test_quantity_defaults_to_one() -> None:
    assert parse(json.dumps(event(quantity=_DROP)).encode()).quantity == 1


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe{}", "not_utf8"),
        (b"{not json", "not_json"),
        (b"", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"text"', "not_object"),
        (json.dumps(event(extra="x")).encode(), "unknown_field"),
        (json.dumps(event(org="x")).encode(), "unknown_field"),
        (json.dumps(event(id=_DROP)).encode(), "missing_field"),
        (json.dumps(event(occurred_at=_DROP)).encode(), "missing_field"),
        (json.dumps(event(id="")).encode(), "invalid_id"),
        (json.dumps(event(id="has space")).encode(), "invalid_id"),
        (json.dumps(event(id="x" * 129)).encode(), "invalid_id"),
        # contract v2: a well-formed type no meter reads is unknown, a malformed one invalid
        (json.dumps(event(type="api_calls")).encode(), "unknown_type"),
        (json.dumps(event(type="API CALL")).encode(), "invalid_type"),
        (json.dumps(event(type=7)).encode(), "invalid_type"),
        (json.dumps(event(org_id="not-a-uuid")).encode(), "invalid_uuid"),
        (json.dumps(event(org_id=12)).encode(), "invalid_uuid"),
        (json.dumps(event(user_id="nope")).encode(), "invalid_uuid"),
        (json.dumps(event(user_id=[ORG])).encode(), "invalid_uuid"),
        (json.dumps(event(occurred_at="\u0662026-03-15T11:00:00Z")).encode(), "invalid_timestamp"),
        (json.dumps(event(quantity=-1)).encode(), "negative_quantity"),
        (json.dumps(event(quantity="5")).encode(), "invalid_quantity"),
        (json.dumps(event(quantity=True)).encode(), "invalid_quantity"),
        (json.dumps(event(quantity=None)).encode(), "invalid_quantity"),
        (
            b'{"id":"a","type":"api_call","org_id":"%s","quantity":NaN,"occurred_at":"2026-03-15T11:00:00Z"}'
            % ORG.encode(),
            "not_json",
        ),
        (
            b'{"id":"a","type":"api_call","org_id":"%s","quantity":Infinity,"occurred_at":"2026-03-15T11:00:00Z"}'
            % ORG.encode(),
            "not_json",
        ),
        (
            b'{"id":"a","type":"api_call","org_id":"%s","quantity":1e400,"occurred_at":"2026-03-15T11:00:00Z"}'
            % ORG.encode(),
            "invalid_quantity",
        ),
        (
            b'{"id":"a","type":"api_call","org_id":"%s","quantity":1234567890123456789,"occurred_at":"2026-03-15T11:00:00Z"}'
            % ORG.encode(),
            "quantity_too_precise",
        ),
        (
            b'{"id":"a","type":"api_call","org_id":"%s","quantity":0.1234567890123456789,"occurred_at":"2026-03-15T11:00:00Z"}'
            % ORG.encode(),
            "quantity_too_precise",
        ),
        (json.dumps(event(occurred_at="2026-03-15T11:00:00")).encode(), "timestamp_without_offset"),
        (json.dumps(event(occurred_at="2026-03-15")).encode(), "invalid_timestamp"),
        (json.dumps(event(occurred_at="yesterday")).encode(), "invalid_timestamp"),
        (json.dumps(event(occurred_at=1700000000)).encode(), "invalid_timestamp"),
        (json.dumps(event(occurred_at="2026-02-30T00:00:00Z")).encode(), "invalid_timestamp"),
        (json.dumps(event(occurred_at="2026-03-15T12:05:01Z")).encode(), "timestamp_in_future"),
        (json.dumps(event(occurred_at="2026-02-08T11:59:59Z")).encode(), "timestamp_too_old"),
        (json.dumps(event(type="user_active")).encode(), "user_required"),
        (json.dumps(event(metadata=[1])).encode(), "invalid_metadata"),
        (json.dumps(event(metadata={"note": "a\x00b"})).encode(), "invalid_metadata"),
        (json.dumps(event(metadata={"a\x00": 1})).encode(), "invalid_metadata"),
        (json.dumps(event(metadata={"deep": [{"x": "\ud800"}]})).encode(), "invalid_metadata"),
        (json.dumps(event(metadata={"blob": "x" * MAX_EVENT_BYTES})).encode(), "too_large"),
    ],
)
def test_each_rule_has_its_own_code(raw: bytes, code: str) -> None:
    assert code_of(raw) == code


def test_boundaries_are_inclusive() -> None:
    assert parse(json.dumps(event(occurred_at="2026-03-15T12:05:00Z")).encode())
    assert parse(json.dumps(event(occurred_at="2026-02-08T12:00:00Z")).encode())
    assert parse(
        b'{"id":"a","type":"api_call","org_id":"%s","quantity":123456789012345678,"occurred_at":"2026-03-15T11:00:00Z"}'
        % ORG.encode()
    )


def test_offset_is_kept_and_compared_in_utc() -> None:
    parsed = parse(json.dumps(event(occurred_at="2026-03-15T13:00:00+02:00")).encode())
    assert parsed.occurred_at == datetime(2026, 3, 15, 11, tzinfo=UTC)


def test_unstorable_metadata_says_what_is_wrong() -> None:
    with pytest.raises(InvalidEvent) as nul:
        parse(json.dumps(event(metadata={"k": "\x00"})).encode())
    with pytest.raises(InvalidEvent) as surrogate:
        parse(json.dumps(event(metadata={"k": ["\udfff"]})).encode())
    assert "U+0000" in nul.value.reason
    assert "surrogate" in surrogate.value.reason
    # a surrogate pair is one ordinary character and passes
    assert parse(
        b'{"id":"a","type":"api_call","org_id":"%s","occurred_at":"2026-03-15T11:00:00Z",'
        b'"metadata":{"k":"\\ud83d\\ude00"}}' % ORG.encode()
    ).metadata == {"k": "\U0001f600"}


def test_reason_names_the_field() -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse(json.dumps(event(typo_field=1)).encode())
    assert "typo_field" in caught.value.reason


# ------------------------------------------------------------ properties
ids = st.from_regex(r"\A[A-Za-z0-9._:-]{1,128}\Z")
quantities = st.one_of(
    st.integers(min_value=0, max_value=10**17),
    st.decimals(min_value=0, max_value=10**12, places=6, allow_nan=False, allow_infinity=False),
)
offsets = st.integers(min_value=-12 * 60, max_value=14 * 60).map(lambda m: timedelta(minutes=m))
moments = st.integers(min_value=0, max_value=34 * 86400).map(lambda s: NOW - timedelta(seconds=s))
# Characters PostgreSQL can store: neither U+0000 nor a lone surrogate (category Cs).
storable_characters = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**9), 10**9)
    | st.text(storable_characters, max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(storable_characters, max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def valid_events(draw: st.DrawFn) -> UsageEvent:
    kind = draw(st.sampled_from(list(EventType)))
    user = draw(st.uuids()) if kind is EventType.USER_ACTIVE else draw(st.none() | st.uuids())
    moment = draw(moments)
    tz = __import__("datetime").timezone(draw(offsets))
    return UsageEvent(
        id=draw(ids),
        type=kind,
        org_id=draw(st.uuids()),
        user_id=user,
        quantity=Decimal(draw(quantities)),
        occurred_at=moment.astimezone(tz),
        metadata=draw(
            st.none()
            | st.dictionaries(
                st.text(storable_characters, max_size=8),
                json_values,
                max_size=4,
            )
        ),
    )


@given(valid_events())
@settings(max_examples=300)
def test_any_valid_event_round_trips(original: UsageEvent) -> None:
    parsed = parse(original.to_json())
    assert parsed == original


@given(st.binary(max_size=400))
@settings(max_examples=500)
def test_no_bytes_crash_the_validator(raw: bytes) -> None:
    try:
        parse(raw)
    except InvalidEvent as error:
        assert error.code and error.reason


@given(
    st.dictionaries(
        st.sampled_from(
            ["id", "type", "org_id", "user_id", "quantity", "occurred_at", "metadata", "x"]
        ),
        json_values
        | st.uuids().map(str)
        | st.floats(allow_nan=True)
        | st.sampled_from([e.value for e in EventType]),
    )
)
@settings(max_examples=500)
def test_no_document_crashes_the_validator(document: dict[str, object]) -> None:
    raw = json.dumps(document, allow_nan=True).encode()
    try:
        parsed = parse(raw)
    except InvalidEvent as error:
        assert error.code and error.reason
    else:
        assert parsed.quantity >= 0


def test_client_ids_are_time_ordered() -> None:
    from metering.client import new_event_id

    first, second = new_event_id(), new_event_id()
    assert UUID(first).version == 7
    assert first < second
