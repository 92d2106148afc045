"""The SQL against its oracle (aggregator/semantics.py), on the real PostgreSQL: random events
in zones with daylight-saving changes, some arriving late, aggregated by the incremental pass
and by the full recompute, must give exactly the rows the plain Python definition gives."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from aggregator.semantics import SEEDED_KINDS, Event, Kind, expected_aggregates, period_start
from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from metering.config import Settings
from metering.metrics import AggregatorMetrics
from metering.models import EventType, UsageEvent
from metering.storage.events import EventStore, IncomingEvent

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Pacific/Chatham"]
NOW = datetime.now(UTC).replace(microsecond=0)
USERS = [uuid.UUID(int=n + 1) for n in range(4)]


def test_a_day_across_a_dst_change_is_one_period_and_months_follow_the_zone() -> None:
    # 2026-03-29: Berlin springs forward; 00:30 and 23:30 local are 22 hours apart
    early = datetime(2026, 3, 28, 23, 30, tzinfo=UTC)  # 00:30 CET on the 29th
    late = datetime(2026, 3, 29, 21, 30, tzinfo=UTC)  # 23:30 CEST on the 29th
    assert period_start(early, "day", "Europe/Berlin") == date(2026, 3, 29)
    assert period_start(late, "day", "Europe/Berlin") == date(2026, 3, 29)
    assert period_start(early, "day", "UTC") == date(2026, 3, 28)
    assert period_start(datetime(2026, 1, 31, 23, 0, tzinfo=UTC), "month", "Asia/Kolkata") == (
        date(2026, 2, 1)
    )


def test_each_kind_means_what_its_table_says() -> None:
    org, t = uuid.uuid4(), datetime(2026, 5, 1, 12, tzinfo=UTC)
    events = [
        Event(org, "storage_used", t, Decimal(5)),
        Event(org, "storage_used", t + timedelta(hours=1), Decimal(3)),
        Event(org, "storage_used", t + timedelta(hours=1), Decimal(4)),  # same time: larger
        Event(org, "user_active", t, Decimal(1), USERS[0]),
        Event(org, "user_active", t, Decimal(1), USERS[0]),
        Event(org, "user_active", t, Decimal(1), USERS[1]),
        Event(org, "api_call", t, Decimal("2.5")),
        Event(org, "api_call", t, Decimal("0.5")),
    ]
    rows = expected_aggregates(events, {org: "UTC"})
    day = t.date()
    assert rows[(org, "storage_used", "day", day)] == (Decimal(4), 3)
    assert rows[(org, "user_active", "day", day)] == (Decimal(2), 3)
    assert rows[(org, "api_call", "month", day.replace(day=1))] == (Decimal(3), 2)
    assert set(SEEDED_KINDS.values()) == set(Kind)


@st.composite
def histories(draw: st.DrawFn) -> tuple[dict[int, str], list[list[tuple[int, Event]]]]:
    """Events of up to three orgs in random zones, in up to three arrival waves, each wave
    possibly reaching back weeks (late events correcting past periods)."""
    zones = {n: draw(st.sampled_from(ZONES)) for n in range(draw(st.integers(1, 3)))}
    waves = []
    for _ in range(draw(st.integers(1, 3))):
        wave = []
        for _ in range(draw(st.integers(1, 12))):
            kind = draw(st.sampled_from(list(SEEDED_KINDS)))
            org = draw(st.sampled_from(sorted(zones)))
            seconds = draw(st.integers(0, 33 * 86400))
            quantity = draw(st.decimals(0, 10**6, places=3, allow_nan=False, allow_infinity=False))
            user = draw(st.sampled_from(USERS)) if kind == "user_active" else None
            # org index stands in for the org id, filled in per example
            wave.append(
                (
                    org,
                    Event(uuid.UUID(int=0), kind, NOW - timedelta(seconds=seconds), quantity, user),
                )
            )
        waves.append(wave)
    return zones, waves


async def _stored(
    db: asyncpg.Connection, orgs: list[uuid.UUID]
) -> dict[tuple[object, ...], tuple[Decimal, int]]:
    rows = await db.fetch(
        "SELECT org_id, event_type, period, period_start, value, event_count "
        "FROM usage_aggregations WHERE org_id = ANY($1::uuid[])",
        orgs,
    )
    return {
        (r["org_id"], r["event_type"], r["period"], r["period_start"]): (
            r["value"],
            r["event_count"],
        )
        for r in rows
    }


@pytest.mark.services
@given(histories())
@hypothesis_settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_pass_and_the_recompute_agree_with_the_reference(
    migrated_database: str,
    settings: Settings,
    history: tuple[dict[int, str], list[list[tuple[int, Event]]]],
) -> None:
    zones_by_index, waves = history

    async def run() -> None:
        pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
        assert pool is not None
        db = await asyncpg.connect(migrated_database)
        try:
            orgs = {n: uuid.uuid4() for n in zones_by_index}
            zones = {orgs[n]: zone for n, zone in zones_by_index.items()}
            for org, zone in zones.items():
                await db.execute(
                    "INSERT INTO org_subscriptions (org_id, timezone) VALUES ($1, $2)", org, zone
                )
            store, written = EventStore(pool), []
            own = Aggregator(
                settings, AggregateStore(pool), None, AggregatorMetrics(CollectorRegistry())
            )
            for wave_number, wave in enumerate(waves):
                batch = []
                for n, (index, event) in enumerate(wave):
                    real = Event(
                        orgs[index],
                        event.event_type,
                        event.occurred_at,
                        event.quantity,
                        event.user_id,
                    )
                    written.append(real)
                    batch.append(
                        IncomingEvent(
                            UsageEvent(
                                id=f"w{wave_number}-{n}",
                                type=EventType(real.event_type),
                                org_id=real.org_id,
                                user_id=real.user_id,
                                quantity=real.quantity,
                                occurred_at=real.occurred_at,
                            )
                        )
                    )
                await store.write_batch(batch)
                await own.run_once()  # incremental, wave by wave: later waves are late events
            expected = expected_aggregates(written, zones)
            assert await _stored(db, list(orgs.values())) == expected
            aggregates = AggregateStore(pool)
            for org in orgs.values():
                for period in ("day", "month"):
                    await aggregates.reaggregate(
                        period, NOW - timedelta(days=40), NOW + timedelta(days=1), org
                    )
            assert await _stored(db, list(orgs.values())) == expected
        finally:
            await db.close()
            await pool.close()

    asyncio.run(run())
