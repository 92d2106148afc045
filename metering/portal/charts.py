"""The geometry of a usage page's day chart, as numbers an SVG template draws (pure).

A chart covers every local day of a period: one bar per day (the meter's value that day,
as the usage API answers it), optionally the running total over the period (what a
period-scoped limit compares with) and the limit as a horizontal line. The template writes
each value exactly as the API does into `data-value`, so a test reads the chart's numbers
back from the page and compares them with the API's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

WIDTH = 640.0
HEIGHT = 220.0
LEFT = 56.0  # room for the value axis' labels
RIGHT = 8.0
TOP = 12.0
BOTTOM = 24.0  # room for the day labels


def exact(value: Decimal) -> str:
    """A decimal as the API writes it (`"value"`): plain notation, no trailing zeros."""
    return format(value.normalize(), "f")


def readable(value: Decimal) -> str:
    """A decimal for people: thousands separated, at most 3 decimals shown."""
    rounded = value.quantize(Decimal("0.001")) if value != value.to_integral() else value
    return format(rounded.normalize(), ",f")


def compact(value: Decimal) -> str:
    """An axis label: 950, 2.5k, 1.2M, 3G (at most 3 significant digits)."""
    for size, suffix in (
        (Decimal(10) ** 12, "T"),
        (Decimal(10) ** 9, "G"),
        (Decimal(10) ** 6, "M"),
        (Decimal(10) ** 3, "k"),
    ):
        if abs(value) >= size:
            return f"{(value / size).quantize(Decimal('0.01')).normalize():f}{suffix}"
    return format(value.quantize(Decimal("0.01")).normalize(), "f")


def nice_ceiling(value: Decimal) -> Decimal:
    """The smallest of 1, 2, 2.5, 5 x 10^n that is at least `value` (> 0)."""
    if value <= 0:
        return Decimal(1)
    exponent = value.adjusted()
    for _ in range(2):
        for step in (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5)):
            candidate = step.scaleb(exponent)
            if candidate >= value:
                return candidate
        exponent += 1
    return Decimal(10).scaleb(exponent)


@dataclass(frozen=True)
class Bar:
    day: date
    value: Decimal
    x: float
    y: float
    width: float
    height: float

    @property
    def exact(self) -> str:
        return exact(self.value)


@dataclass(frozen=True)
class Point:
    day: date
    value: Decimal
    x: float
    y: float

    @property
    def exact(self) -> str:
        return exact(self.value)


@dataclass(frozen=True)
class DayChart:
    width: float
    height: float
    bars: list[Bar]
    running: list[Point]  # empty: no running total drawn
    limit: Decimal | None
    limit_y: float | None
    ticks: list[tuple[float, str]]  # (y, label) of the value axis
    day_labels: list[tuple[float, str]]  # (x, label) under some bars
    plot_left: float
    plot_right: float
    plot_bottom: float

    @property
    def limit_exact(self) -> str | None:
        return None if self.limit is None else exact(self.limit)

    @property
    def running_path(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.running)


def days_of(start: date, end: date) -> list[date]:
    """The local days of [start, end)."""
    return [start + timedelta(days=n) for n in range((end - start).days)]


def day_chart(
    days: list[date],
    values: dict[date, Decimal],
    running: list[tuple[date, Decimal]] | None,
    limit: Decimal | None,
) -> DayChart:
    """Bars for `days` (a day without a value has none), the running total's points
    (when given) and the limit line, on one value axis from 0 to a round number above the
    largest of them."""
    top = max([Decimal(0), *values.values(), *(v for _, v in running or []), limit or Decimal(0)])
    axis = nice_ceiling(top * Decimal("1.05")) if top > 0 else Decimal(1)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(days))
    index = {day: n for n, day in enumerate(days)}

    def y_of(value: Decimal) -> float:
        return TOP + plot_h * (1 - float(value / axis))

    bars = []
    for day in days:
        value = values.get(day)
        if value is None:
            continue
        y = y_of(value)
        bars.append(
            Bar(day, value, LEFT + index[day] * slot + slot * 0.15, y, slot * 0.7, TOP + plot_h - y)
        )
    points = [
        Point(day, total, LEFT + index[day] * slot + slot / 2, y_of(total))
        for day, total in running or []
        if day in index
    ]
    ticks = [(y_of(axis * k / 4), compact(axis * k / 4)) for k in range(5)]
    every = max(1, round(len(days) / 8))
    labels = [
        (LEFT + n * slot + slot / 2, f"{day.day}")
        for n, day in enumerate(days)
        if n % every == 0 or day.day == 1
    ]
    return DayChart(
        WIDTH,
        HEIGHT,
        bars,
        points,
        limit,
        None if limit is None else y_of(limit),
        ticks,
        labels,
        LEFT,
        WIDTH - RIGHT,
        TOP + plot_h,
    )
