"""The command line's pure helpers (no services)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from itertools import pairwise

from metering.cli import month_windows


def test_month_windows_cut_dates_at_each_month_start() -> None:
    assert month_windows(date(2026, 11, 15), date(2027, 2, 3)) == [
        (date(2026, 11, 15), date(2026, 12, 1)),
        (date(2026, 12, 1), date(2027, 1, 1)),
        (date(2027, 1, 1), date(2027, 2, 1)),
        (date(2027, 2, 1), date(2027, 2, 3)),
    ]


def test_month_windows_within_one_month_is_the_window_itself() -> None:
    assert month_windows(date(2026, 2, 1), date(2026, 2, 28)) == [
        (date(2026, 2, 1), date(2026, 2, 28))
    ]
    assert month_windows(date(2026, 2, 1), date(2026, 2, 1)) == []


def test_month_windows_of_datetimes_keep_the_zone_and_cover_without_gaps() -> None:
    zone = timezone(timedelta(hours=-5))
    first = datetime(2026, 1, 31, 22, 30, tzinfo=zone)
    last = datetime(2026, 4, 2, 1, 0, tzinfo=zone)
    windows = month_windows(first, last)
    assert windows[0] == (first, datetime(2026, 2, 1, tzinfo=zone))
    assert windows[-1] == (datetime(2026, 4, 1, tzinfo=zone), last)
    assert len(windows) == 4
    assert all(a[1] == b[0] for a, b in pairwise(windows))
    assert all(start.tzinfo is zone and end.tzinfo is zone for start, end in windows)
    assert month_windows(datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)) == []
