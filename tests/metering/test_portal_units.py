"""Pure parts of the usage pages: chart geometry, period values from day values, and the
overview's rates and quantiles from two Prometheus scrapes."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from metering.portal.charts import compact, day_chart, days_of, exact, nice_ceiling
from metering.portal.org_page import EntitlementView, combined, running_totals
from metering.portal.overview import (
    Sample,
    figures,
    increase,
    parse_metrics,
    quantile_from_buckets,
)

D = Decimal


@pytest.mark.parametrize(
    ("value", "ceiling"),
    [
        ("0.7", "1"),
        ("1", "1"),
        ("1.01", "2"),
        ("2.2", "2.5"),
        ("3", "5"),
        ("7", "10"),
        ("850", "1000"),
        ("1050", "2000"),
        ("0.03", "0.05"),
        ("24000", "25000"),
    ],
)
def test_nice_ceiling(value: str, ceiling: str) -> None:
    assert nice_ceiling(D(value)) == D(ceiling)


def test_compact_and_exact_labels() -> None:
    assert [compact(D(v)) for v in ("0", "950", "2500", "1250000", "3000000000")] == [
        "0",
        "950",
        "2.5k",
        "1.25M",
        "3G",
    ]
    assert exact(D("1.500")) == "1.5" and exact(D("1E+3")) == "1000"


def test_day_chart_draws_bars_to_one_scale_and_the_limit_above() -> None:
    days = days_of(date(2026, 11, 26), date(2026, 12, 26))
    assert len(days) == 30 and days[5] == date(2026, 12, 1)
    values = {days[0]: D(100), days[1]: D(50), days[3]: D(0)}
    running = [(days[0], D(100)), (days[1], D(150)), (days[3], D(150))]
    chart = day_chart(days, values, running, D(1000))
    assert [b.day for b in chart.bars] == [days[0], days[1], days[3]]  # day 2: no bar
    first, second, zero = chart.bars
    assert first.height == pytest.approx(2 * second.height) and zero.height == 0
    assert first.y + first.height == pytest.approx(chart.plot_bottom)
    assert chart.limit_y is not None and chart.limit_y < first.y  # the limit is higher
    assert chart.limit_exact == "1000"
    assert [p.exact for p in chart.running] == ["100", "150", "150"]
    assert chart.running[0].x < chart.running[1].x < chart.running[2].x
    # the axis: from 0 to a round number above the limit (1,000 x 1.05 -> 2,000)
    assert [label for _, label in chart.ticks] == ["0", "500", "1k", "1.5k", "2k"]


def test_day_chart_without_usage_or_limit() -> None:
    chart = day_chart(days_of(date(2026, 2, 1), date(2026, 3, 1)), {}, None, None)
    assert chart.bars == [] and chart.running == [] and chart.limit_y is None
    assert len(chart.day_labels) >= 4


def test_period_values_from_day_values() -> None:
    days = [(date(2026, 12, n), D(v)) for n, v in ((1, "3"), (2, "1.5"), (3, "4"))]
    assert running_totals("sum", days) == [D(3), D("4.5"), D("8.5")]
    assert running_totals("count", days) == [D(3), D("4.5"), D("8.5")]
    assert running_totals("max", days) == [D(3), D(3), D(4)]
    assert running_totals("latest", days) is None
    assert running_totals("unique_count", days) is None
    values = [v for _, v in days]
    assert combined("sum", values) == D("8.5")
    assert combined("max", values) == D(4)
    assert combined("latest", values) == D(4)
    assert combined("unique_count", values) is None
    assert combined("sum", []) == 0


def test_entitlement_states() -> None:
    def view(used: int, limit: int, thresholds: list[int] | None = None) -> EntitlementView:
        access = {"feature_key": "f", "used": used, "limit": limit, "thresholds": thresholds}
        return EntitlementView("f", access, "month")

    assert view(50, 100).state == "ok"
    assert view(80, 100).state == "near"
    assert view(60, 100, [50, 100]).state == "near"
    assert view(100, 100).state == "over" and view(130, 100).bar_percent == 100
    unlimited = EntitlementView("f", {"used": 5, "limit": -1, "unlimited": True}, "month")
    assert unlimited.limit is None and unlimited.percent is None and unlimited.state == "ok"


def test_counter_increase_survives_a_restart() -> None:
    assert increase(150.0, 100.0) == 50.0
    assert increase(20.0, 100.0) == 20.0  # the process restarted: counts from zero
    assert increase(None, 5.0) is None and increase(7.0, None) == 7.0


def test_quantiles_as_histogram_quantile() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert quantile_from_buckets(0.5, buckets) == pytest.approx(0.1)
    assert quantile_from_buckets(0.99, buckets) == pytest.approx(0.95)
    assert quantile_from_buckets(0.5, {float("inf"): 0.0}) is None
    # everything above the last finite bound: that bound, as Prometheus answers
    assert quantile_from_buckets(0.9, {1.0: 0.0, float("inf"): 10.0}) == 1.0


EXPOSITION = """
# TYPE metering_events_stored counter
metering_events_stored_total {stored}
# TYPE metering_events_dead_lettered counter
metering_events_dead_lettered_total{{reason="not_json"}} {not_json}
metering_events_dead_lettered_total{{reason="unknown_type"}} 1.0
# TYPE metering_aggregation_freshness_seconds histogram
metering_aggregation_freshness_seconds_bucket{{le="0.5"}} {fast}
metering_aggregation_freshness_seconds_bucket{{le="1.0"}} {all}
metering_aggregation_freshness_seconds_bucket{{le="+Inf"}} {all}
metering_aggregation_freshness_seconds_count {all}
metering_aggregation_freshness_seconds_sum 1.0
# TYPE metering_webhook_pending gauge
metering_webhook_pending 4.0
"""


def test_figures_from_two_scrapes() -> None:
    older = Sample(
        100.0,
        parse_metrics(EXPOSITION.format(stored=1000, not_json=2, fast=10, all=10)),
        {"u": None},
    )
    newer = Sample(
        160.0,
        parse_metrics(EXPOSITION.format(stored=7000, not_json=5, fast=60, all=110)),
        {"u": None, "v": "down"},
    )
    shown = figures(newer, older)
    assert shown.window_seconds == 60
    assert shown.stored_per_second == pytest.approx(100.0)
    assert shown.dead_letters["not_json"] == (5.0, pytest.approx(0.05))
    assert shown.dead_letters["unknown_type"] == (1.0, 0.0)
    # freshness over the minute: 50 of 100 under 0.5 s, the rest under 1 s
    assert shown.freshness_p50 == pytest.approx(0.5)
    assert shown.freshness_p99 == pytest.approx(0.99)
    assert shown.webhooks_pending == 4.0 and shown.consumer_lag is None
    assert shown.unreachable == {"v": "down"}
    alone = figures(newer, None)
    assert alone.stored_per_second is None and alone.window_seconds is None
    assert alone.dead_letters["not_json"] == (5.0, None)


async def test_page_cache_builds_once_per_second_and_refreshes_behind() -> None:
    import asyncio

    from metering.portal.page_cache import PageCache

    cache = PageCache(seconds=0.3, stale=1.0)
    builds = 0

    async def build() -> str:
        nonlocal builds
        builds += 1
        await asyncio.sleep(0.05)
        return f"page {builds}"

    # ten requests at once: one build, ten answers
    pages = await asyncio.gather(*(cache.get("a", build) for _ in range(10)))
    assert pages == ["page 1"] * 10 and builds == 1
    assert await cache.get("b", build) == "page 2"  # another key: its own build
    assert await cache.get("a", build) == "page 1"
    await asyncio.sleep(0.35)
    # older than `seconds`: answered at once with the page it had, its successor built behind
    assert await cache.get("a", build) == "page 1"
    assert await cache.get("a", build) == "page 1"
    await asyncio.sleep(0.1)
    assert await cache.get("a", build) == "page 3" and builds == 3
    await asyncio.sleep(1.1)  # older than `stale`: built for the request
    assert await cache.get("a", build) == "page 4"

    async def broken() -> str:
        raise RuntimeError("database down")

    await asyncio.sleep(1.1)
    with pytest.raises(RuntimeError):
        await cache.get("a", broken)
    assert await cache.get("a", build) == "page 5"  # the failure was not kept
