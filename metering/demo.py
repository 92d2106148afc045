"""`metering run --demo`: realistic traffic for four organizations on the four plans, so a
newcomer sees rows arrive, aggregates grow, an access check flip to denied and a
`usage.limits` message, within a minute."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import asyncpg
from aiokafka import AIOKafkaConsumer

from metering.client import UsageClient
from metering.config import Settings
from metering.portal.tokens import PortalTokenStore
from metering.storage.audit import AuditLog
from metering.storage.reads import ReadStore, SubscriptionStore
from metering.topics import committed_reader

DEMO_ORGS = {
    "free": uuid.UUID("00000000-0000-4000-8000-000000000001"),
    "pro": uuid.UUID("00000000-0000-4000-8000-000000000002"),
    "business": uuid.UUID("00000000-0000-4000-8000-000000000003"),
    "enterprise": uuid.UUID("00000000-0000-4000-8000-000000000004"),
}
LOOK_AT_ROWS = (
    "SELECT org_id, event_type, quantity, occurred_at FROM usage_events "
    "ORDER BY received_at DESC LIMIT 10"
)
TYPES = ["api_call", "record_created", "automation_run", "ai_tokens_used", "user_active"]


def say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


async def publish_samples(settings: Settings, seconds: float = 60) -> None:
    """Run the demo (see the module docstring); prints each step as it happens."""
    dsn = settings.database_url.get_secret_value()
    pool = None
    for _ in range(60):
        try:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
            break
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.5)
    if pool is None:
        say("PostgreSQL is not reachable; run `metering dev up` first")
        return
    limits = committed_reader(settings, settings.limits_topic, offset_reset="latest")
    try:
        await limits.start()
        subscriptions = SubscriptionStore(pool)
        for plan, org in DEMO_ORGS.items():
            await subscriptions.put(
                org, plan, "active", 5, 1, "Europe/Berlin" if plan == "pro" else "UTC"
            )
        store = ReadStore(pool)  # the API's access check: one path for every reader
        free = DEMO_ORGS["free"]
        before = await store.check(free, "max_api_calls_per_month", Decimal(1))
        assert before is not None  # a seeded feature key
        say(
            "organizations, one per plan: "
            + ", ".join(f"{plan} {org}" for plan, org in DEMO_ORGS.items())
        )
        say(
            f"free org api calls this month: used {before['used']} of {before['limit']}, "
            f"allowed={before['allowed']}"
        )
        await _traffic(settings, store, limits, seconds)
        page = await PortalTokenStore(pool, AuditLog(pool)).issue(
            free, None, timedelta(hours=8), created_by="demo"
        )
        say(
            "done. Look at the rows with:\n"
            f"  psql {dsn} -c '{LOOK_AT_ROWS}'\n"
            f"  .venv/bin/metering usage {free}\n"
            f"  .venv/bin/metering check {free} max_api_calls_per_month\n"
            f"  curl -s localhost:{settings.metrics_port}/metrics | grep ^metering_events\n"
            "or in a browser, the free org's usage page (a portal token for 8 hours):\n"
            f"  http://127.0.0.1:{settings.http_port}/orgs/{free}?token={page.token}\n"
            f"  and the operator overview http://127.0.0.1:{settings.http_port}/ (sign in with "
            "a key of `.venv/bin/metering keys create --scope admin`)\n"
            "Press Ctrl-C to stop the service."
        )
    finally:
        await limits.stop()
        await pool.close()


async def _traffic(
    settings: Settings, store: ReadStore, limits: AIOKafkaConsumer, seconds: float
) -> None:
    rng = random.Random()
    users = [uuid.uuid4() for _ in range(12)]
    free = DEMO_ORGS["free"]
    flipped = noticed = False
    sent = 0
    started = time.monotonic()
    async with UsageClient(settings) as client:
        while time.monotonic() - started < seconds:
            for org in DEMO_ORGS.values():
                kind = rng.choice(TYPES)
                await client.enqueue(
                    client.build(
                        org_id=org,
                        type=kind,
                        quantity=rng.randint(1, 20),
                        user_id=rng.choice(users) if kind == "user_active" else None,
                    )
                )
                sent += 1
            # the free org calls the API hard: 1,000 calls a month is its limit
            await client.enqueue(client.build(org_id=free, type="api_call", quantity=40))
            sent += 1
            await client.flush()
            if not flipped:
                check = await store.check(free, "max_api_calls_per_month", Decimal(1))
                if check is not None and not check["allowed"]:
                    flipped = True
                    say(
                        f"after {time.monotonic() - started:.0f}s and {sent} events: free org used "
                        f"{check['used']} of {check['limit']} api calls "
                        f"-> allowed={check['allowed']}"
                    )
            for records in (await limits.getmany(timeout_ms=10)).values():
                for record in records:
                    message = json.loads(record.value)
                    if not noticed or message["threshold_percent"] == 100:
                        say(f"usage.limits: {json.dumps(message)}")
                        noticed = True
            if flipped and noticed and time.monotonic() - started > 20:
                break
            await asyncio.sleep(0.4)
    say(f"published {sent} events in {time.monotonic() - started:.0f}s")
