"""Pure limit logic: thresholds, unlimited, deterministic crossing ids."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

from aggregator.limits import LimitUsage, crossing_id, crossings, thresholds_reached

ORG = uuid.UUID("11111111-1111-4111-8111-111111111111")


def test_thresholds_at_exact_boundaries() -> None:
    assert thresholds_reached(Decimal(79), 100) == []
    assert thresholds_reached(Decimal(80), 100) == [80]
    assert thresholds_reached(Decimal("99.99"), 100) == [80]
    assert thresholds_reached(Decimal(100), 100) == [80, 100]
    assert thresholds_reached(Decimal("0.8"), 1) == [80]  # storage GB are fractional


def test_unlimited_never_compared_as_a_number() -> None:
    assert thresholds_reached(Decimal(10**30), -1) == []


def test_zero_limit_is_reached_by_any_use() -> None:
    assert thresholds_reached(Decimal(0), 0) == []
    assert thresholds_reached(Decimal(1), 0) == [80, 100]


def test_crossing_ids_are_deterministic_and_distinct() -> None:
    march = date(2026, 3, 1)
    same = crossing_id(ORG, "max_api_calls_per_month", "month", march, 80)
    assert same == crossing_id(ORG, "max_api_calls_per_month", "month", march, 80)
    others = {
        crossing_id(ORG, "max_api_calls_per_month", "month", march, 100),
        crossing_id(ORG, "max_api_calls_per_month", "month", date(2026, 4, 1), 80),
        crossing_id(ORG, "max_mau", "month", march, 80),
        crossing_id(uuid.uuid4(), "max_api_calls_per_month", "month", march, 80),
        crossing_id(ORG, "max_records", "lifetime", None, 80),
    }
    assert same not in others and len(others) == 5


def test_crossings_carry_the_message_fields() -> None:
    now = datetime(2026, 3, 5, tzinfo=UTC)
    found = crossings(
        [LimitUsage(ORG, "max_mau", "month", date(2026, 3, 1), Decimal(100), 100)], now
    )
    assert [c.threshold_percent for c in found] == [80, 100]
    message = found[1].message()
    assert message == {
        "id": str(found[1].id),
        "org_id": str(ORG),
        "feature_key": "max_mau",
        "period": "month",
        "period_start": "2026-03-01",
        "threshold_percent": 100,
        "used": "100",
        "limit": 100,
        "crossed_at": "2026-03-05T00:00:00+00:00",
    }


def test_thresholds_already_recorded_are_not_proposed_again() -> None:
    now = datetime(2026, 3, 5, tzinfo=UTC)
    march = date(2026, 3, 1)
    over = Decimal(120)
    assert [
        c.threshold_percent
        for c in crossings(
            [LimitUsage(ORG, "max_mau", "month", march, over, 100, frozenset({80}))], now
        )
    ] == [100]
    assert (
        crossings(
            [LimitUsage(ORG, "max_mau", "month", march, over, 100, frozenset({80, 100}))], now
        )
        == []
    )
    # a limit lowered after an 80% crossing: only the 100% one is new
    assert [
        c.threshold_percent
        for c in crossings(
            [LimitUsage(ORG, "max_mau", "month", march, Decimal(60), 50, frozenset({80}))], now
        )
    ] == [100]
