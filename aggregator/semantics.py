"""What every aggregate means, in plain Python: the reference the SQL is checked against.

`usage_aggregations` holds, per organization, event type, period (`day`, `month`) and
period start (a date in the organization's time zone), a `value` and an `event_count`. The
value depends on the event type's aggregation kind (`event_types.aggregation`):

- `sum`: the sum of the quantities of its events;
- `gauge_latest`: the quantity of its latest reading (greatest `occurred_at`; on equal
  times the larger quantity);
- `distinct_users`: the number of distinct `user_id`s among its events (exact).

`event_count` is the number of its events, for every kind. An event belongs to the period
that holds its `occurred_at` in the organization's zone (a 23- or 25-hour day across a
daylight-saving change is just a shorter or longer day). Every stored event counts once,
whenever it arrived (a late event corrects its past period). `docs/aggregation.md` explains
the periods, the watermark and why this is exactly once.

This module is the oracle: `tests/aggregator/test_semantics.py` stores random events, lets
the incremental pass and the full recompute aggregate them in SQL, and requires exactly
`expected_aggregates` of the same events. It is pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from uuid import UUID
from zoneinfo import ZoneInfo


class Kind(StrEnum):
    """The aggregation kinds of `event_types.aggregation`."""

    SUM = "sum"
    GAUGE_LATEST = "gauge_latest"
    DISTINCT_USERS = "distinct_users"


# The kinds of the seeded event types (migration 002, contract section 2).
SEEDED_KINDS: Mapping[str, Kind] = {
    "api_call": Kind.SUM,
    "record_created": Kind.SUM,
    "automation_run": Kind.SUM,
    "schedule_executed": Kind.SUM,
    "ai_tokens_used": Kind.SUM,
    "storage_used": Kind.GAUGE_LATEST,
    "user_active": Kind.DISTINCT_USERS,
}
PERIODS = ("day", "month")


@dataclass(frozen=True)
class Event:
    """What aggregation reads of a stored event."""

    org_id: UUID
    event_type: str
    occurred_at: datetime
    quantity: Decimal
    user_id: UUID | None = None


Key = tuple[UUID, str, str, date]  # org, event type, period, period start


def period_start(moment: datetime, period: str, zone: str) -> date:
    """The first day of the `period` holding `moment`, in `zone`'s calendar."""
    local = moment.astimezone(ZoneInfo(zone)).date()
    if period == "day":
        return local
    if period == "month":
        return local.replace(day=1)
    raise ValueError(f"period must be day or month, not {period!r}")


def value_of(kind: Kind, events: Iterable[Event]) -> Decimal:
    """The value of one period's events of one type (see the module's table)."""
    chosen = list(events)
    if kind is Kind.SUM:
        return sum((e.quantity for e in chosen), Decimal(0))
    if kind is Kind.GAUGE_LATEST:
        return max(chosen, key=lambda e: (e.occurred_at, e.quantity)).quantity
    if kind is Kind.DISTINCT_USERS:
        return Decimal(len({e.user_id for e in chosen if e.user_id is not None}))
    raise ValueError(f"unknown aggregation kind {kind!r}")


def expected_aggregates(
    events: Iterable[Event],
    zones: Mapping[UUID, str],
    kinds: Mapping[str, Kind] = SEEDED_KINDS,
) -> dict[Key, tuple[Decimal, int]]:
    """Every `usage_aggregations` row the events make: (value, event_count) by key.
    `zones` gives each organization's time zone (absent: UTC)."""
    groups: dict[Key, list[Event]] = defaultdict(list)
    for event in events:
        zone = zones.get(event.org_id, "UTC")
        for period in PERIODS:
            start = period_start(event.occurred_at, period, zone)
            groups[(event.org_id, event.event_type, period, start)].append(event)
    return {
        key: (value_of(kinds[key[1]], members), len(members)) for key, members in groups.items()
    }
