"""Calendar arithmetic shared by the commands: months as units of work and of retention.

(Periods of aggregation, in an organization's zone, are defined in aggregator/semantics.py
and computed in SQL.)
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import TypeVar

W = TypeVar("W", date, datetime)  # bounds of month_windows: dates or datetimes
_KEEP = re.compile(r"(\d+)(mo|d)")


def add_months(day: W, months: int) -> W:
    """The first day of the month `months` after (or before) `day`'s month, at midnight for
    a datetime (keeping its zone)."""
    index = day.year * 12 + day.month - 1 + months
    first = day.replace(year=index // 12, month=index % 12 + 1, day=1)
    if isinstance(first, datetime):
        first = first.replace(hour=0, minute=0, second=0, microsecond=0)
    return first


def month_windows(first: W, last: W) -> list[tuple[W, W]]:
    """[first, last) cut at each calendar month's start: the unit of work (and of progress)
    of `reaggregate` and `reconcile`. Dates or datetimes; a datetime keeps its zone."""
    windows: list[tuple[W, W]] = []
    cursor = first
    while cursor < last:
        following = add_months(cursor, 1)
        windows.append((cursor, min(following, last)))
        cursor = min(following, last)
    return windows


def keep_from(keep: str, now: datetime) -> datetime:
    """The horizon of `metering retention --keep`: `400d` is 400 days before `now`, `13mo`
    the first day of the month 13 months before `now`'s. Raises ValueError otherwise."""
    match = _KEEP.fullmatch(keep.strip())
    if match is None:
        raise ValueError("use a number of months or days, e.g. 13mo or 400d")
    amount = int(match.group(1))
    if match.group(2) == "d":
        return now - timedelta(days=amount)
    return add_months(now, -amount)
