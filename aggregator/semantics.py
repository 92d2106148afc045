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
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from uuid import UUID
from zoneinfo import ZoneInfo

from metering.meters.definition import MeterSpec, read_event


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


# --- Meters (contract section 2): every aggregation kind of a meter, by window ----------
#
# A meter reads the events of its type (`metering.meters.definition.read_event`: filter,
# value path, dimensions, skip reasons) and keeps, per organization, dimension values and
# period (or query window: hour, day, month in a zone), a value and an event count:
#
# - `sum`: the sum of the values; `count`: the number of events; `max`: the greatest value;
# - `latest`: the value of the reading with the greatest `occurred_at` (on equal times the
#   larger value);
# - `unique_count`: the number of distinct values (exact: a month is not the sum of days).
#
# Skipped events (unreadable for the meter) count in neither value nor event count.

# org, dimensions, window, the instant the window starts
MeterRowKey = tuple[UUID, tuple[tuple[str, str | None], ...], str, datetime]


@dataclass(frozen=True)
class StoredEvent:
    """An event as a meter reads it."""

    org_id: UUID
    occurred_at: datetime
    quantity: Decimal
    user_id: UUID | None = None
    metadata: Mapping[str, object] | None = None


def window_start(moment: datetime, window: str, zone: str) -> datetime:
    """The instant the `window` (hour, day, month) holding `moment` starts at, in `zone`.
    Days and months start at local midnight; an hour starts at the local hour the moment
    is in, at the moment's own offset: the hour repeated when summer time ends is two
    windows of one real hour each, and a zone half an hour off UTC has its own hours."""
    local = moment.astimezone(ZoneInfo(zone))
    if window == "hour":
        return moment - timedelta(
            minutes=local.minute, seconds=local.second, microseconds=local.microsecond
        )
    if window == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    elif window == "month":
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0, fold=0)
    else:
        raise ValueError(f"window must be hour, day or month, not {window!r}")
    return start.replace(tzinfo=None).replace(tzinfo=ZoneInfo(zone))


def meter_value(aggregation: str, readings: list[tuple[datetime, Decimal | str]]) -> Decimal:
    """The value of one window's readings (occurred_at, value) for `aggregation`."""
    if aggregation in ("sum", "count"):
        return sum((Decimal(v) for _, v in readings), Decimal(0))
    if aggregation == "max":
        return max(Decimal(v) for _, v in readings)
    if aggregation == "latest":
        return Decimal(max(readings, key=lambda r: (r[0], Decimal(r[1])))[1])
    if aggregation == "unique_count":
        return Decimal(len({v for _, v in readings}))
    raise ValueError(f"no reference for aggregation {aggregation!r}")


def expected_meter_usage(
    spec: MeterSpec,
    events: Iterable[StoredEvent],
    zones: Mapping[UUID, str],
    window: str = "day",
    zone: str | None = None,
) -> tuple[dict[MeterRowKey, tuple[Decimal, int]], dict[str, int]]:
    """Every row a meter makes of `events` by `window`, with (value, event_count), in each
    organization's zone (`zones`, default UTC) or in `zone` for all; and the events it
    skipped by reason. Dimensions are (path, value) pairs in `group_by` order."""
    groups: dict[MeterRowKey, list[tuple[datetime, Decimal | str]]] = defaultdict(list)
    skipped: dict[str, int] = defaultdict(int)
    for event in events:
        user = str(event.user_id) if event.user_id is not None else None
        reading = read_event(spec, event.quantity, user, dict(event.metadata or {}))
        if reading is None:
            continue
        if reading.skipped is not None:
            skipped[reading.skipped] += 1
            continue
        assert reading.value is not None
        where = zone or zones.get(event.org_id, "UTC")
        start = window_start(event.occurred_at, window, where)
        dimensions = tuple((path, reading.dimensions[path]) for path in spec.group_by)
        groups[(event.org_id, dimensions, window, start)].append((event.occurred_at, reading.value))
    rows = {
        key: (meter_value(spec.aggregation.value, readings), len(readings))
        for key, readings in groups.items()
    }
    return rows, dict(skipped)
