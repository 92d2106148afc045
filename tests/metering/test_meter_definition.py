"""Meter definitions and what a meter reads from an event: pure rules, no services."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from metering.meters.definition import (
    Aggregation,
    InvalidMeter,
    MeterSpec,
    number_of,
    read_event,
)


def spec(**fields: Any) -> MeterSpec:
    return MeterSpec.parse({"key": "m", "event_type": "t", "aggregation": "sum", **fields})


def test_defaults_follow_the_aggregation() -> None:
    assert spec().value == "quantity"
    assert spec(aggregation="unique_count").value == "user_id"
    assert spec(aggregation="count").aggregation is Aggregation.COUNT
    assert spec(limit_key="max_x").limit_scope == "period"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"aggregation": "avg"}, "aggregation"),
        ({"value": "metadata."}, "value"),
        ({"value": "metadata.a b"}, "value"),
        ({"value": "user_id"}, "value"),
        ({"group_by": ["a", "a"]}, "group_by"),
        ({"group_by": ["a", "b", "c", "d"]}, "group_by"),
        ({"filter": {"a": [1.5]}}, "filter.a"),
        ({"filter": {"a": []}}, "filter.a"),
        ({"filter": {"a": 1, "a.b": 2}}, "filter"),
        ({"filter": {f"p{n}": list(range(4)) for n in range(6)}}, "filter"),
        ({"limit_key": "max_x", "group_by": ["a"]}, "limit_key"),
        ({"limit_key": "max_x", "aggregation": "latest", "limit_scope": "lifetime"}, "limit_scope"),
        ({"limit_key": "max_x", "aggregation": "time_weighted"}, "limit_key"),
        ({"limit_scope": "period"}, "limit_key"),
        ({"limit_key": "max_x", "limit_unit": "1.5"}, "limit_unit"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_definitions_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidMeter) as refused:
        spec(**fields)
    assert refused.value.field == field
    assert refused.value.reason


def test_a_filter_becomes_every_combination_of_its_values() -> None:
    meter = spec(filter={"env": ["prod", "staging"], "geo.region": ["eu", "us"], "on": True})
    assert meter.filter_containments() == [
        {"env": "prod", "geo": {"region": "eu"}, "on": True},
        {"env": "prod", "geo": {"region": "us"}, "on": True},
        {"env": "staging", "geo": {"region": "eu"}, "on": True},
        {"env": "staging", "geo": {"region": "us"}, "on": True},
    ]
    assert spec().filter_containments() is None


def test_what_a_meter_reads() -> None:
    tokens = spec(value="metadata.usage.tokens", group_by=["model"], filter={"env": "prod"})
    read = read_event(
        tokens, Decimal(1), None, {"env": "prod", "model": "m1", "usage": {"tokens": "12.5"}}
    )
    assert read is not None and (read.value, read.dimensions) == (Decimal("12.5"), {"model": "m1"})
    assert read_event(tokens, Decimal(1), None, {"env": "dev"}) is None
    missing = read_event(tokens, Decimal(1), None, {"env": "prod"})
    assert missing is not None and missing.skipped == "value_missing"
    assert missing.dimensions == {"model": None}
    text = read_event(tokens, Decimal(1), None, {"env": "prod", "usage": {"tokens": "lots"}})
    assert text is not None and text.skipped == "not_a_number"
    long = read_event(tokens, Decimal(1), None, {"env": "prod", "model": "x" * 129})
    assert long is not None and long.skipped == "dimension_too_long"
    users = spec(aggregation="unique_count")
    assert read_event(users, Decimal(1), None, {}).skipped == "value_missing"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "number"),
    [
        (3, Decimal(3)),
        (Decimal("0.5"), Decimal("0.5")),
        ("1e3", Decimal("1e3")),
        ("-2.50", Decimal("-2.50")),
        (".5", Decimal(".5")),
        (" 1", None),
        ("1_000", None),
        ("NaN", None),
        ("Infinity", None),
        ("1e1000", None),
        (True, None),
        (None, None),
        ([1], None),
    ],
)
def test_numbers_a_value_path_may_hold(raw: object, number: Decimal | None) -> None:
    assert number_of(raw) == number
