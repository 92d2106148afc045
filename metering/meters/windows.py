"""Usage queries by window (contract section 5): the pure part. Which windows a range
covers in a zone, how a query is served, and the cursor that pages through the rows.

How a query is served (docs/meters.md argues it with numbers):

- **day and month windows in the organization's own zone** read the stored rollups
  (`meter_aggregations`, or `usage_aggregations` for the seeded meters): any range;
- **hour windows, and any window in another zone**, are computed from the raw events of
  the organization through the `(org_id, occurred_at)` index, with the same reading rules
  as the rollups (SQL `meter_event_readings`), over the events the aggregator has counted
  (below the watermark), so both paths give the same numbers. Their cost grows with the
  organization's events in the range, so the range is bounded: `MAX_RAW_RANGE`; a longer
  one is refused with a 400 that names the largest allowed.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from metering.calendar import add_months
from metering.errors import MeteringError

WINDOWS = ("hour", "day", "month")
# The longest range computed from raw events, per window (see the module docstring).
MAX_RAW_RANGE = {"hour": timedelta(days=7), "day": timedelta(days=31), "month": timedelta(days=31)}
MAX_ROLLUP_RANGE = timedelta(days=3 * 366)
DEFAULT_PAGE = 1000
MAX_PAGE = 10_000


class InvalidUsageQuery(MeteringError):
    """A usage query that cannot be answered as asked: `field` and `reason` say why and
    what would be allowed."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def zone_of(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidUsageQuery("tz", f"{name!r} is not an IANA time zone") from None


def parse_bound(text: str, zone: ZoneInfo, field: str) -> datetime:
    """An RFC 3339 timestamp with offset, or a date (its midnight in `zone`)."""
    try:
        if len(text) == 10:
            return local_instant(datetime.fromisoformat(text), zone)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidUsageQuery(
            field, f"{text!r} is neither a date (2026-03-01) nor an RFC 3339 timestamp"
        ) from None
    if moment.tzinfo is None:
        raise InvalidUsageQuery(field, f"{text!r} needs an offset (Z or +hh:mm)")
    return moment


def local_instant(local: datetime, zone: ZoneInfo) -> datetime:
    """The instant a local wall-clock time names in `zone` (the earlier one when it is
    repeated, the one after the gap when it is skipped)."""
    return local.replace(tzinfo=zone)


def window_floor(moment: datetime, window: str, zone: ZoneInfo) -> datetime:
    """The local (naive) start of the window holding `moment` in `zone`."""
    local = moment.astimezone(zone).replace(tzinfo=None)
    if window == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    if window == "day":
        return local.replace(hour=0, minute=0, second=0, microsecond=0)
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_window(local_start: datetime, window: str) -> datetime:
    if window == "hour":
        return local_start + timedelta(hours=1)
    if window == "day":
        return local_start + timedelta(days=1)
    return add_months(local_start, 1)


def first_window_at_or_after(moment: datetime, window: str, zone: ZoneInfo) -> datetime:
    """The local start of the first window that starts at or after `moment`."""
    floor = window_floor(moment, window, zone)
    if local_instant(floor, zone) < moment:
        return next_window(floor, window)
    return floor


@dataclass(frozen=True)
class WindowRange:
    """The windows a query covers: local starts in [first, end) of `window` in `zone`."""

    window: str
    zone: ZoneInfo
    first: datetime  # local, naive
    end: datetime  # local, naive: the start of the first window not covered

    @property
    def start_instant(self) -> datetime:
        return local_instant(self.first, self.zone)

    @property
    def end_instant(self) -> datetime:
        return local_instant(self.end, self.zone)

    def first_date(self) -> date:
        return self.first.date()

    def end_date(self) -> date:
        return self.end.date()


def window_range(
    window: str, zone: ZoneInfo, start: datetime | None, end: datetime | None, now: datetime
) -> WindowRange:
    """The windows starting in [start, end) (default: the current month in `zone`)."""
    if window not in WINDOWS:
        raise InvalidUsageQuery("window", "must be hour, day or month")
    if start is None:
        start = local_instant(window_floor(now, "month", zone), zone)
    if end is None:
        end = local_instant(next_window(window_floor(start, "month", zone), "month"), zone)
    if end <= start:
        raise InvalidUsageQuery("to", "must be after from")
    return WindowRange(
        window,
        zone,
        first_window_at_or_after(start, window, zone),
        first_window_at_or_after(end, window, zone),
    )


def check_served_range(windows: WindowRange, from_rollups: bool) -> None:
    """Refuse a range this path cannot serve fast, naming the largest allowed."""
    span = windows.end_instant - windows.start_instant
    limit = MAX_ROLLUP_RANGE if from_rollups else MAX_RAW_RANGE[windows.window]
    if span > limit:
        how = (
            "from the stored day and month rows"
            if from_rollups
            else f"{windows.window} windows computed from raw events (or in another zone "
            "than the organization's)"
        )
        raise InvalidUsageQuery(
            "to", f"the range spans {span}; at most {limit.days} days are served for {how}"
        )


def encode_cursor(start: datetime, dimensions: str) -> str:
    """The page token after the row of window `start` (an instant) and `dimensions`."""
    raw = json.dumps([start.isoformat(), dimensions]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        start, dimensions = json.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(start), str(dimensions)
    except (ValueError, TypeError, binascii.Error):
        raise InvalidUsageQuery("cursor", "not a cursor this API returned") from None
