"""Sample traffic for newcomers: a few organizations, every event type, rows you can see."""

from __future__ import annotations

import asyncio
import random
import sys
import uuid

import asyncpg

from metering.client import UsageClient
from metering.config import Settings

COUNT_DEMO_EVENTS = "SELECT count(*) FROM usage_events WHERE org_id = ANY($1::uuid[])"
LOOK_AT_ROWS = (
    "SELECT org_id, event_type, quantity, occurred_at FROM usage_events "
    "ORDER BY received_at DESC LIMIT 10"
)
DEMO_ORGS = [uuid.UUID(f"00000000-0000-4000-8000-00000000000{n}") for n in range(1, 5)]


async def publish_samples(settings: Settings, events: int = 200) -> None:
    """Publish `events` sample events for the demo orgs, wait until the consumer stored
    them, and print how to look at them."""
    rng = random.Random()
    users = [uuid.uuid4() for _ in range(8)]
    types = ["api_call", "record_created", "automation_run", "ai_tokens_used", "user_active"]
    async with UsageClient(settings) as client:
        for _ in range(events):
            kind = rng.choice(types)
            event = client.build(
                org_id=rng.choice(DEMO_ORGS),
                type=kind,
                quantity=rng.randint(1, 20),
                user_id=rng.choice(users) if kind == "user_active" else None,
            )
            await client.enqueue(event)
        await client.flush()
    dsn = settings.database_url.get_secret_value()
    stored = 0
    for _ in range(120):
        try:
            conn = await asyncpg.connect(dsn)
            try:
                stored = await conn.fetchval(COUNT_DEMO_EVENTS, DEMO_ORGS)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            pass
        if stored >= events:
            break
        await asyncio.sleep(0.5)
    print(
        f"\ndemo: published {events} sample events for {len(DEMO_ORGS)} organizations; "
        f"{stored} are in usage_events now. Look at them with:\n"
        f"  psql {dsn} -c '{LOOK_AT_ROWS}'\n"
        f"  curl -s localhost:{settings.metrics_port}/metrics | grep ^metering_events\n"
        f"  .venv/bin/metering send --org {DEMO_ORGS[0]} --type api_call --quantity 5\n"
        "Press Ctrl-C to stop.\n",
        file=sys.stderr,
        flush=True,
    )
