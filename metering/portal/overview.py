"""The operator overview's live figures (`GET /`): the same numbers Prometheus has, read
from the same endpoints Prometheus scrapes, for someone without Grafana.

`MetricsSampler` scrapes the processes' `/metrics` (consumer, aggregator, webhook deliverer:
`METERING_OVERVIEW_METRICS_URLS`) every few seconds while the API runs and keeps a minute
of samples; `figures` turns two samples into rates and quantiles exactly as PromQL's
`rate` and `histogram_quantile` would over that minute. Pure apart from the scrape.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_EVERY_SECONDS = 10.0
KEEP_SECONDS = 75.0
FRESH_ENOUGH_SECONDS = 1.0

# (sample name, sorted label pairs) -> value
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    series: Series
    reached: dict[str, str | None]  # url -> None when scraped, else why not


def parse_metrics(text: str) -> Series:
    """Every sample of a Prometheus text exposition, by name and labels."""
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            key = (sample.name, labels)
            series[key] = series.get(key, 0.0) + sample.value
    return series


def total(series: Series, name: str, **match: str) -> float | None:
    """The sum of `name`'s samples whose labels include `match`; None when there is none."""
    found = [
        value
        for (sample, labels), value in series.items()
        if sample == name and all((k, v) in labels for k, v in match.items())
    ]
    return sum(found) if found else None


def by_label(series: Series, name: str, label: str) -> dict[str, float]:
    """`name`'s samples summed per value of `label`."""
    out: dict[str, float] = {}
    for (sample, labels), value in series.items():
        if sample == name:
            wanted = dict(labels).get(label)
            if wanted is not None:
                out[wanted] = out.get(wanted, 0.0) + value
    return out


def increase(newer: float | None, older: float | None) -> float | None:
    """A counter's increase between two readings; a reset (a restarted process) counts
    from zero, as PromQL's `increase` does."""
    if newer is None:
        return None
    if older is None or newer < older:
        return newer
    return newer - older


def quantile_from_buckets(q: float, buckets: dict[float, float]) -> float | None:
    """`histogram_quantile(q, ...)` over cumulative bucket counts by upper bound."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count <= 0:
        return None
    rank = q * count
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return previous_bound
            span = buckets[bound] - previous_count
            inside = 0.0 if span <= 0 else (rank - previous_count) / span
            return previous_bound + (bound - previous_bound) * inside
        previous_bound, previous_count = bound, buckets[bound]
    return previous_bound


def bucket_increase(newer: Series, older: Series | None, name: str) -> dict[float, float]:
    """The increase of a histogram's cumulative buckets (`name_bucket`) between samples."""
    bounds: dict[float, float] = {}
    for (sample, labels), value in newer.items():
        if sample != f"{name}_bucket":
            continue
        le = float(dict(labels)["le"])
        before = None if older is None else older.get((sample, labels))
        bounds[le] = bounds.get(le, 0.0) + (increase(value, before) or 0.0)
    return bounds


@dataclass(frozen=True)
class Figures:
    """What the overview shows; None where no process reported the metric."""

    window_seconds: float | None
    stored_per_second: float | None
    duplicates_per_second: float | None
    dead_letters: dict[str, tuple[float, float | None]]  # reason -> (total, per second)
    consumer_lag: float | None
    watermark_lag_seconds: float | None
    meter_watermark_lag_seconds: float | None
    freshness_p50: float | None
    freshness_p99: float | None
    webhooks_pending: float | None
    webhooks_oldest_seconds: float | None
    unreachable: dict[str, str] = field(default_factory=dict)


def figures(newest: Sample, oldest: Sample | None) -> Figures:
    """The overview's figures from the newest sample and one about a minute older (rates
    and quantiles over the time between them; without an older one, none)."""
    now, before = newest.series, (oldest.series if oldest is not None else None)
    seconds = None if oldest is None else newest.at - oldest.at

    def rate(name: str) -> float | None:
        if before is None or not seconds:
            return None
        grown = increase(total(now, name), total(before, name))
        return None if grown is None else grown / seconds

    letters: dict[str, tuple[float, float | None]] = {}
    earlier = by_label(before, "metering_events_dead_lettered_total", "reason") if before else {}
    for reason, count in by_label(now, "metering_events_dead_lettered_total", "reason").items():
        grown = increase(count, earlier.get(reason))
        per_second = None if grown is None or not seconds else grown / seconds
        letters[reason] = (count, per_second)
    fresh = bucket_increase(now, before, "metering_aggregation_freshness_seconds")
    if not any(fresh.values()):  # nothing aggregated in the window: since the start
        fresh = bucket_increase(now, None, "metering_aggregation_freshness_seconds")
    return Figures(
        window_seconds=seconds,
        stored_per_second=rate("metering_events_stored_total"),
        duplicates_per_second=rate("metering_events_duplicate_total"),
        dead_letters=dict(sorted(letters.items(), key=lambda item: -item[1][0])),
        consumer_lag=total(now, "metering_consumer_lag_messages"),
        watermark_lag_seconds=total(now, "metering_aggregation_watermark_lag_seconds"),
        meter_watermark_lag_seconds=total(now, "metering_meter_watermark_lag_seconds"),
        freshness_p50=quantile_from_buckets(0.5, fresh),
        freshness_p99=quantile_from_buckets(0.99, fresh),
        webhooks_pending=total(now, "metering_webhook_pending"),
        webhooks_oldest_seconds=total(now, "metering_webhook_oldest_undelivered_seconds"),
        unreachable={url: why for url, why in newest.reached.items() if why is not None},
    )


class MetricsSampler:
    """Scrapes `urls` every SCRAPE_EVERY_SECONDS inside `running()`, from the first time
    someone asks for the figures (an API nobody opens the overview of scrapes nothing);
    keeps KEEP_SECONDS of samples."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._samples: deque[Sample] = deque()
        self._client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def _scrape(self) -> Sample:
        assert self._client is not None
        series: Series = {}
        reached: dict[str, str | None] = {}

        async def one(url: str) -> None:
            assert self._client is not None
            try:
                response = await self._client.get(url)
                response.raise_for_status()
                for key, value in parse_metrics(response.text).items():
                    series[key] = series.get(key, 0.0) + value
                reached[url] = None
            except (httpx.HTTPError, ValueError) as error:
                reached[url] = f"{type(error).__name__}: {error}"[:200]

        await asyncio.gather(*(one(url) for url in self.urls))
        return Sample(time.monotonic(), series, reached)

    async def sample(self) -> Sample:
        """A new sample, kept with the others."""
        async with self._lock:
            latest = await self._scrape()
            self._samples.append(latest)
            while self._samples and latest.at - self._samples[0].at > KEEP_SECONDS:
                self._samples.popleft()
            return latest

    async def current(self) -> Figures:
        """The figures over the last minute, from a sample at most 1 s old."""
        if self._task is None and self._client is not None:
            self._task = asyncio.create_task(self._loop())
        newest = self._samples[-1] if self._samples else None
        if newest is None or time.monotonic() - newest.at > FRESH_ENOUGH_SECONDS:
            newest = await self.sample()
        older = [s for s in self._samples if newest.at - s.at >= 1.0]
        return figures(newest, older[0] if older else None)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SCRAPE_EVERY_SECONDS)
            await self.sample()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MetricsSampler]:
        async with httpx.AsyncClient(timeout=2.0) as client:
            self._client = client
            try:
                yield self
            finally:
                if self._task is not None:
                    self._task.cancel()
                    await asyncio.gather(self._task, return_exceptions=True)
                    self._task = None
                self._client = None
