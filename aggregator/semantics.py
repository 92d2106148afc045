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
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, localcontext
from enum import StrEnum
from uuid import UUID
from zoneinfo import ZoneInfo

from metering.calendar import add_months
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


def billing_cycle(anchor: date, day: date) -> tuple[date, date]:
    """The billing cycle [start, end) holding local `day` for a subscription anchored on
    `anchor` (contract section 8): from the anchor's day of month (the month's last day when
    it has fewer) to that day of the next month. SQL: billing_cycle, 50_limits.sql."""

    def anchored(month_first: date) -> date:
        last = (add_months(month_first, 1) - timedelta(days=1)).day
        return month_first.replace(day=min(anchor.day, last))

    start = anchored(day.replace(day=1))
    if day < start:
        start = anchored(add_months(day, -1))
    return start, anchored(add_months(start, 1))


def cycle_of(moment: datetime, anchor: date, zone: str) -> tuple[date, date]:
    """The cycle an instant falls in, in `zone` (DST-correct: a cycle is whole local days)."""
    return billing_cycle(anchor, moment.astimezone(ZoneInfo(zone)).date())


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
        return moment.astimezone(UTC) - timedelta(
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


# time_weighted: the sum of value * hours in force inside each window. The readings of each series
# (meter and dimension values) form a step function: a reading is in force from its
# occurred_at until the next reading of its series (on equal times the larger value), the
# last one before a window carries into it, and a window not over at `now` counts up to
# then. value·seconds is exact; value·hours is rounded once, half away from zero, to 12
# decimal places. `event_count` is the number of readings inside the window.

HOURS_DECIMALS = 12


def windows_between(
    start: datetime, end: datetime, window: str, zone: str
) -> list[tuple[datetime, datetime]]:
    """The windows [start, next) of `window` in `zone` that start in [start, end); `start`
    must be a window start (an instant)."""
    found = []
    if window == "hour":
        moment = start.astimezone(UTC)  # real hours (aware arithmetic in a zone is wall-clock)
        while moment < end:
            found.append((moment, moment + timedelta(hours=1)))
            moment += timedelta(hours=1)
        return found
    tz = ZoneInfo(zone)
    local = start.astimezone(tz).replace(tzinfo=None)
    while (at := local.replace(tzinfo=tz)) < end:
        following = local + timedelta(days=1) if window == "day" else add_months(local, 1)
        found.append((at, following.replace(tzinfo=tz)))
        local = following
    return found


def value_hours(value_seconds: Decimal) -> Decimal:
    """value·seconds as value·hours, rounded once, half away from zero, to 12 decimals."""
    with localcontext() as exact:
        exact.prec = 200
        hours = value_seconds * 10**HOURS_DECIMALS / 3600
        rounded: Decimal = hours.quantize(Decimal(1), rounding=ROUND_HALF_UP) / 10**HOURS_DECIMALS
        return rounded


def expected_time_weighted(
    spec: MeterSpec,
    events: Iterable[StoredEvent],
    windows: list[tuple[datetime, datetime]],
    now: datetime,
    kept: tuple[str, ...] | None = None,
) -> dict[tuple[tuple[tuple[str, str | None], ...], datetime], tuple[Decimal, int]]:
    """(dimensions kept, window start) -> (value·hours, readings inside) for one org's
    events of a time_weighted meter; series whose dimensions are not kept are added up."""
    series: dict[tuple[tuple[str, str | None], ...], dict[datetime, Decimal]] = defaultdict(dict)
    for event in events:
        user = str(event.user_id) if event.user_id is not None else None
        reading = read_event(spec, event.quantity, user, dict(event.metadata or {}))
        if reading is None or reading.skipped is not None:
            continue
        assert isinstance(reading.value, Decimal)
        full = tuple((path, reading.dimensions[path]) for path in spec.group_by)
        known = series[full].get(event.occurred_at)
        series[full][event.occurred_at] = (
            reading.value if known is None else max(known, reading.value)
        )
    keep = spec.group_by if kept is None else kept
    seconds: dict[tuple[tuple[tuple[str, str | None], ...], datetime], Decimal] = defaultdict(
        Decimal
    )
    counts: dict[tuple[tuple[tuple[str, str | None], ...], datetime], int] = defaultdict(int)
    for full, readings in series.items():
        dims = tuple(pair for pair in full if pair[0] in keep)
        times = sorted(readings)
        for i, at in enumerate(times):
            until = times[i + 1] if i + 1 < len(times) else None
            for start, following in windows:
                end = min(following, now) if until is None else min(following, now, until)
                begin = max(at, start)
                if start >= now or at >= min(following, now) or end <= begin:
                    continue
                span = end - begin
                micro = (span.days * 86400 + span.seconds) * 10**6 + span.microseconds
                with localcontext() as exact:
                    exact.prec = 200
                    seconds[(dims, start)] += readings[at] * Decimal(micro) / 10**6
                if start <= at < following:
                    counts[(dims, start)] += 1
    return {key: (value_hours(total), counts[key]) for key, total in seconds.items()}
