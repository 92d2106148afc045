"""The meters' side of the aggregator: meter passes, backfills and their metrics.

Runs beside the v1 passes (aggregator.service), in a loop of its own: a meter pass
(aggregator.meter_store), then one chunk of a pending backfill (aggregator.backfill), back
to back while there is work, every `idle_interval` otherwise. Crossings of the limits the
meters count are recorded in the pass's transaction and published with the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aggregator.backfill import Backfiller
from aggregator.limits import Crossing, LimitUsage, crossings
from aggregator.meter_store import MeterPassResult, MeterPassStore
from metering.config import Settings
from metering.metrics import AggregatorMetrics
from metering.models import utc_now
from metering.retry import retry_postgres

T = TypeVar("T")
PASS_INTERVAL_SECONDS = 1.0
log = logging.getLogger("metering.aggregator")


def decide_crossings(usages: list[LimitUsage]) -> list[Crossing]:
    """The crossings of `usages`, stamped now (the v1 pass and the meter pass use it)."""
    return crossings(usages, utc_now())


class MeterCounter:
    def __init__(
        self,
        settings: Settings,
        store: MeterPassStore,
        backfiller: Backfiller,
        metrics: AggregatorMetrics,
        idle_interval: float = 0.1,
    ) -> None:
        self._settings = settings
        self._store = store
        self._backfiller = backfiller
        self._metrics = metrics
        self._idle_interval = idle_interval
        self._skips_seen: dict[tuple[str, str], int] = {}
        self.backfilling = False  # a backfill chunk ran in the last run_once

    async def run_once(self) -> MeterPassResult:
        """One meter pass and one backfill chunk, retried while PostgreSQL is down."""
        started = time.perf_counter()
        result = await self._retry_db(lambda: self._store.run_pass(decide_crossings))
        self._metrics.meter_pass_seconds.observe(time.perf_counter() - started)
        self._metrics.meter_pairs.inc(result.pairs)
        for crossing in result.new_crossings:
            self._metrics.crossings.labels(
                crossing.feature_key, str(crossing.threshold_percent)
            ).inc()
            log.info(
                "limit crossing: org %s %s %s%% (%s of %s)",
                crossing.org_id,
                crossing.feature_key,
                crossing.threshold_percent,
                crossing.used,
                crossing.limit,
            )
        step = await self._retry_db(self._backfiller.step)
        self.backfilling = step is not None
        if step is not None:
            self._metrics.backfilled.inc(step.events)
        skips = await self._retry_db(self._store.skips)
        for (meter, reason), total in skips.items():
            new = total - self._skips_seen.get((meter, reason), 0)
            if new > 0:
                self._metrics.meter_skipped.labels(meter, reason).inc(new)
        self._skips_seen = skips
        self._metrics.meter_watermark_lag.set(
            await self._retry_db(self._store.watermark_lag_seconds)
        )
        return result

    async def run_forever(self, passed: asyncio.Event) -> None:
        """Meter passes at most every PASS_INTERVAL_SECONDS, and busy at most the fraction
        `meter_pass_busy_fraction` of the time (METERING_METER_PASS_BUSY_FRACTION, default
        a quarter): a pass that took t seconds is followed by a pause of t * (1/f - 1). Sets
        `passed` after a pass that recorded crossings (the publisher then looks for them).
        Runs until cancelled.

        Why: the cost of a meter pass is one upsert per (meter, period, dimension values)
        it touches, so fewer, larger passes cost less per event (rows of the same org and
        day collapse); and on a small machine meters that cost more than it can give must
        not starve the v1 passes (the seeded meters, the access check, their crossings)
        and the consumer: they fall behind instead, which
        `metering_meter_watermark_lag_seconds` shows."""
        while True:
            started = time.perf_counter()
            result = await self.run_once()
            if result.new_crossings:
                passed.set()
            took = time.perf_counter() - started
            rest = took * (1 / self._settings.meter_pass_busy_fraction - 1)
            await asyncio.sleep(max(PASS_INTERVAL_SECONDS - took, rest, self._idle_interval))

    async def _retry_db(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry_postgres(
            operation, settings=self._settings, metrics=self._metrics.dependencies
        )
