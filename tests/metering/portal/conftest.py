"""A hand-made usage history for the usage pages' tests, and Debian's Chromium."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from metering.config import Settings
from metering.meters.definition import MeterSpec
from metering.meters.store import MeterStore
from metering.metrics import AggregatorMetrics
from metering.models import UsageEvent
from metering.storage.events import EventStore, IncomingEvent
from tests.conftest import ROOT
from tests.metering.api.test_meter_usage import settle

ZONE = "Europe/Berlin"
ARTIFACTS = ROOT / "build" / "screenshots"


@dataclass(frozen=True)
class History:
    org: uuid.UUID
    other_org: uuid.UUID
    anchor: date
    cycle_start: date
    today: date
    sum_meter: str  # a defined meter with group_by ["model"]
    unique_meter: str  # unique_count of user_id with group_by ["model"]
    api_calls_by_day: dict[date, Decimal]  # api_call quantities of `org` by local day
    tokens_by_model: dict[str, Decimal]  # the sum meter's cycle totals by model


def cycle_anchor(today: date) -> date:
    """An anchor whose cycle began about ten days before `today` (day <= 28: no clamping)."""
    began = today - timedelta(days=10)
    return began if began.day <= 28 else began.replace(day=28)


@pytest.fixture
async def history(settings: Settings, migrated_database: str) -> History:
    """Org A in Europe/Berlin with a billing anchor, 85% of its api_call limit used over
    the cycle's days (crossing 80%), a soft ai-token override it is past, and two defined
    meters with a `model` dimension; org B with usage of its own."""
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=3)
    assert pool is not None
    try:
        tag = uuid.uuid4().hex[:8]
        kind = f"page_{tag}"
        sum_key, unique_key = f"tokens_{tag}", f"users_{tag}"
        meters = MeterStore(pool)
        await meters.create(
            MeterSpec.parse(
                {
                    "key": sum_key,
                    "event_type": kind,
                    "aggregation": "sum",
                    "group_by": ["model"],
                    "description": "tokens by model",
                }
            )
        )
        await meters.create(
            MeterSpec.parse(
                {
                    "key": unique_key,
                    "event_type": kind,
                    "aggregation": "unique_count",
                    "value": "user_id",
                    "group_by": ["model"],
                }
            )
        )
        zone = ZoneInfo(ZONE)
        today = datetime.now(zone).date()
        anchor = cycle_anchor(today)
        cycle_start = anchor  # the anchor's own month: its cycle is the current one
        org, other = uuid.uuid4(), uuid.uuid4()
        for who in (org, other):
            await pool.execute(
                "INSERT INTO org_subscriptions (org_id, plan, timezone, billing_anchor) "
                "VALUES ($1, 'free', $2, $3)",
                who,
                ZONE,
                anchor,
            )
        await pool.execute(
            "INSERT INTO org_limit_overrides (org_id, feature_key, limit_value, soft) "
            "VALUES ($1, 'max_ai_tokens_per_month', 5000, true)",
            org,
        )
        days = [cycle_start + timedelta(days=n) for n in range((today - cycle_start).days + 1)]
        now = datetime.now(UTC)
        events: list[IncomingEvent] = []
        api_calls: dict[date, Decimal] = {}
        tokens: dict[str, Decimal] = {}
        users = [uuid.uuid4() for _ in range(5)]
        # 850 api calls over the days (85% of the free plan's 1,000), uneven per day
        weights = [n % 4 + 1 for n in range(len(days))]
        shares = [Decimal(850 * w // sum(weights)) for w in weights]
        shares[-1] += Decimal(850) - sum(shares)
        for n, (day, quantity) in enumerate(zip(days, shares, strict=True)):
            moment = datetime.combine(day, time(12, 0), zone).astimezone(UTC)
            if moment > now:  # today before noon in Berlin: early this morning
                moment = datetime.combine(day, time(0, 30), zone).astimezone(UTC)
            api_calls[day] = quantity
            events.append(
                IncomingEvent(
                    UsageEvent(
                        id=f"a{tag}{n}",
                        type="api_call",
                        org_id=org,
                        quantity=quantity,
                        occurred_at=moment,
                    )
                )
            )
            events.append(
                IncomingEvent(
                    UsageEvent(
                        id=f"t{tag}{n}",
                        type="ai_tokens_used",
                        org_id=org,
                        quantity=Decimal(600),
                        occurred_at=moment,
                    )
                )
            )
            for m, model in enumerate(("small", "large", "large")):
                amount = Decimal(100 * (m + 1) + n) + Decimal("0.25")
                tokens[model] = tokens.get(model, Decimal(0)) + amount
                events.append(
                    IncomingEvent(
                        UsageEvent(
                            id=f"m{tag}{n}-{m}",
                            type=kind,
                            org_id=org,
                            user_id=users[(n + m) % 5],
                            quantity=amount,
                            occurred_at=moment,
                            metadata={"model": model},
                        )
                    )
                )
            events.append(
                IncomingEvent(
                    UsageEvent(
                        id=f"b{tag}{n}",
                        type=kind,
                        org_id=other,
                        quantity=Decimal(7),
                        user_id=users[0],
                        occurred_at=moment,
                        metadata={"model": "secret-model-of-b"},
                    )
                )
            )
        await EventStore(pool).write_batch(events)
        aggregator = Aggregator(
            settings, AggregateStore(pool), None, AggregatorMetrics(CollectorRegistry())
        )
        await settle(aggregator)
        return History(
            org, other, anchor, cycle_start, today, sum_key, unique_key, api_calls, tokens
        )
    finally:
        await pool.close()


@dataclass
class Browser:
    driver: object  # selenium.webdriver.Chrome

    def save(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))  # type: ignore[attr-defined]
        return path


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, through Debian's chromedriver (./scripts/test installs
    both; a machine without them fails here, it does not skip)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    assert os.path.exists(binary) and os.path.exists(driver_path), (
        "Debian's chromium and chromium-driver are needed: ./scripts/test installs them"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield Browser(driver)
    finally:
        driver.quit()
