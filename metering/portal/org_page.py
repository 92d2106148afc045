"""What an organization's usage page shows (`GET /orgs/{org}`), gathered through the same
stores and functions as the API: the entitlements are `GET .../entitlements`' access checks,
each chart is `GET .../meters/{key}/usage?window=day` over the period, the breakdown the
same with the meter's `group_by`, the crossings `GET .../crossings`. Nothing here computes
usage; it arranges the API's answers for people.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from metering.limits.crossings import Crossing, CrossingStore
from metering.meters.store import Meter, MeterStore
from metering.meters.usage_store import MeterUsageStore, UsageAnswer
from metering.portal.charts import DayChart, day_chart, days_of, exact, readable
from metering.portal.tokens import hidden_limits
from metering.storage.keys import ApiKey
from metering.storage.reads import ReadStore, exact_json

RECENT_CROSSINGS = 10


def running_totals(aggregation: str, values: list[tuple[date, Decimal]]) -> list[Decimal] | None:
    """The value of the period up to each day, from the day values, for the kinds whose
    period value is made of its days' (sum, count, time_weighted: the sum; max: the
    largest); None for `latest` and `unique_count`, whose period value is not."""
    out: list[Decimal] = []
    so_far: Decimal | None = None
    for _, value in values:
        if aggregation == "max":
            so_far = value if so_far is None else max(so_far, value)
        elif aggregation in ("sum", "count", "time_weighted"):
            so_far = value if so_far is None else so_far + value
        else:
            return None
        out.append(so_far)
    return out


def combined(aggregation: str, values: list[Decimal]) -> Decimal | None:
    """The period's value from its days' values, in day order, as `usage_in_cycle` reads
    it: None for unique_count (distinct values do not add up across days)."""
    if not values:
        return Decimal(0)
    if aggregation == "latest":
        return values[-1]
    totals = running_totals(aggregation, [(date.min, v) for v in values])
    return None if totals is None else totals[-1]


@dataclass(frozen=True)
class EntitlementView:
    feature_key: str
    access: dict[str, Any]
    scope: str  # 'cycle', 'month', 'lifetime' or 'flags'

    @property
    def flags(self) -> dict[str, bool] | None:
        flags = self.access.get("flags")
        return dict(flags) if isinstance(flags, dict) else None

    @property
    def unlimited(self) -> bool:
        return bool(self.access.get("unlimited"))

    @property
    def used(self) -> Decimal:
        return Decimal(self.access.get("used") or 0)

    @property
    def limit(self) -> Decimal | None:
        value = self.access.get("limit")
        return None if value is None or value == -1 else Decimal(value)

    @property
    def percent(self) -> float | None:
        if self.limit is None or self.limit <= 0:
            return None
        return float(self.used / self.limit * 100)

    @property
    def bar_percent(self) -> float:
        return min(100.0, self.percent or 0.0)

    @property
    def state(self) -> str:
        """ok, near (past the lowest threshold below 100%), over (at or past the limit)."""
        percent = self.percent
        if percent is None:
            return "ok"
        if percent >= 100:
            return "over"
        lowest = min([t for t in self.access.get("thresholds") or [80] if t < 100] or [80])
        return "near" if percent >= lowest else "ok"

    @property
    def soft(self) -> bool:
        return bool(self.access.get("soft"))

    def text(self, name: str) -> str:
        value = self.access.get(name)
        return "" if value is None else exact(Decimal(value))


@dataclass(frozen=True)
class BreakdownRow:
    dimensions: dict[str, Any]
    value: Decimal
    share: float  # of the largest row, 0..100


@dataclass(frozen=True)
class MeterView:
    meter: Meter
    period_start: date
    period_end: date
    chart: DayChart
    entitlement: EntitlementView | None
    total: Decimal | None  # the period's value so far, when the days make it
    breakdown: list[BreakdownRow]
    breakdown_label: str
    complete: bool

    @property
    def key(self) -> str:
        return self.meter.key

    @property
    def idle(self) -> bool:
        """No usage this period: listed by name only (its limit is in the limits table)."""
        return not self.chart.bars

    @property
    def row(self) -> dict[str, Any]:
        return self.meter.row


@dataclass(frozen=True)
class OrgPage:
    org_id: UUID
    plan: str
    timezone: str
    billing_anchor: date | None
    today: date
    period_start: date
    period_end: date
    entitlements: list[EntitlementView]
    meters: list[MeterView]
    crossings: list[Crossing]
    generated_at: datetime

    def local(self, moment: datetime) -> str:
        return moment.astimezone(ZoneInfo(self.timezone)).strftime("%Y-%m-%d %H:%M")


class OrgPageBuilder:
    def __init__(
        self,
        reads: ReadStore,
        meters: MeterStore,
        meter_usage: MeterUsageStore,
        crossings: CrossingStore,
    ) -> None:
        self._reads = reads
        self._meters = meters
        self._usage = meter_usage
        self._crossings = crossings

    async def build(self, org_id: UUID, key: ApiKey, now: datetime) -> OrgPage:
        """The page's content for `key` (a portal token sees only its meters and their
        limits). Raises what the stores raise (a bug or an outage: a 5xx)."""
        period, meters = await asyncio.gather(
            self._reads.current_period(org_id), self._meters.list()
        )
        shown = [m for m in meters if m.status != "archived" and key.may_read_meter(m.key)]
        hidden = hidden_limits(key, meters)
        entitlement_texts, crossings = await asyncio.gather(
            self._reads.entitlements_json(org_id, hidden),
            self._crossings.recent(org_id, RECENT_CROSSINGS, hidden),
        )
        scope_of = {m.row["limit_key"]: m.row["limit_scope"] for m in meters}
        entitlements = []
        for text in entitlement_texts:
            access = exact_json(text)
            feature = access["feature_key"]
            scope = (
                "flags"
                if "flags" in access and "limit" not in access
                else "lifetime"
                if scope_of.get(feature) == "lifetime"
                else str(access.get("period") or "month")
            )
            entitlements.append(EntitlementView(feature, access, scope))
        by_feature = {e.feature_key: e for e in entitlements}
        start: date = period["start"]
        end: date = period["stop"]
        queries: list[tuple[str, list[str]]] = []
        for meter in shown:
            queries.append((meter.key, []))
            if meter.row["group_by"]:
                queries.append((meter.key, list(meter.row["group_by"])))
        answers = iter(
            await self._usage.day_usage_many(
                org_id, queries, start.isoformat(), end.isoformat(), now
            )
        )
        views = []
        for meter in shown:
            totals = next(answers)
            grouped = next(answers) if meter.row["group_by"] else None
            entitlement = by_feature.get(meter.row["limit_key"] or "")
            views.append(meter_view(meter, entitlement, start, end, totals, grouped))
        return OrgPage(
            org_id=org_id,
            plan=period["plan"],
            timezone=period["timezone"],
            billing_anchor=period["billing_anchor"],
            today=period["today"],
            period_start=start,
            period_end=end,
            entitlements=entitlements,
            meters=views,
            crossings=crossings,
            generated_at=now,
        )


def meter_view(
    meter: Meter,
    entitlement: EntitlementView | None,
    start: date,
    end: date,
    totals: UsageAnswer,
    grouped: UsageAnswer | None,
) -> MeterView:
    """One meter's card from the API's answers: its day totals over [start, end) and, for
    a meter with dimensions, the same by its `group_by`. The period is the organization's
    (its billing cycle or calendar month): a period-scoped limit counts in the same one."""
    per_day = [(r.start.astimezone(totals.windows.zone).date(), r.value) for r in totals.rows]
    aggregation = meter.row["aggregation"]
    running = (
        running_totals(aggregation, per_day)
        if entitlement is not None and entitlement.scope != "lifetime"
        else None
    )
    unit = Decimal(meter.row["limit_unit"])
    limit_in_meter_units = (
        None if entitlement is None or entitlement.limit is None else entitlement.limit * unit
    )
    chart = day_chart(
        days_of(start, end),
        dict(per_day),
        None if running is None else list(zip([d for d, _ in per_day], running, strict=True)),
        limit_in_meter_units,
    )
    breakdown: list[BreakdownRow] = []
    label = ""
    if grouped is not None:
        series: dict[str, list[Decimal]] = {}
        for r in grouped.rows:
            series.setdefault(r.dimensions, []).append(r.value)
        if aggregation == "unique_count":
            label = "on its busiest day"
            values = {dims: max(vals) for dims, vals in series.items()}
        else:
            label = "this period"
            values = {
                dims: value
                for dims, vals in series.items()
                if (value := combined(aggregation, vals)) is not None
            }
        largest = max(values.values(), default=Decimal(0))
        breakdown = [
            BreakdownRow(
                json.loads(dims), value, 0.0 if largest <= 0 else float(value / largest * 100)
            )
            for dims, value in sorted(values.items(), key=lambda item: -item[1])
        ]
    return MeterView(
        meter=meter,
        period_start=start,
        period_end=end,
        chart=chart,
        entitlement=entitlement,
        total=combined(aggregation, [v for _, v in per_day]),
        breakdown=breakdown,
        breakdown_label=label,
        complete=totals.status != "backfilling",
    )


__all__ = ["OrgPage", "OrgPageBuilder", "readable"]
