"""The event types this process accepts, kept current while meters are created and archived.

A type is accepted when a meter that is not archived reads it (a backfilling meter's type
is accepted: its events must be stored to be counted). Every change of the `meters` table
notifies the PostgreSQL channel `metering_meters` (a statement trigger, migration 016); each
consumer and API process LISTENs on a connection of its own and reloads the set on every
notification, so a meter created or archived reaches them within milliseconds, without a
restart. Notifications are not queued for a listener that is away, so the set is also
reloaded every `poll_seconds` (and at once after the listening connection is lost and
opened again): a missed notification costs at most that long, never an event (an event of
a type refused meanwhile is in the dead-letter topic, `metering dlq replay` takes it back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from metering.config import Settings
from metering.models import SEEDED_TYPES
from metering.storage.notifications import follow_channel

log = logging.getLogger("metering.meters")
CHANNEL = "metering_meters"
ACCEPTED_TYPES = "SELECT DISTINCT event_type FROM meters WHERE status <> 'archived'"
POLL_SECONDS = 5.0


async def load_accepted_types(conn: asyncpg.Connection | asyncpg.Pool) -> frozenset[str]:
    """The types some meter that is not archived reads."""
    return frozenset(row["event_type"] for row in await conn.fetch(ACCEPTED_TYPES))


class AcceptedTypes:
    """`current` is the set of accepted types (the seeded ones until the first load)."""

    def __init__(self) -> None:
        self.current: frozenset[str] = SEEDED_TYPES
        self.changed = asyncio.Event()  # set after each reload that changed the set

    def _set(self, types: frozenset[str]) -> None:
        if types != self.current:
            log.info(
                "accepted event types now: %s (was %s)",
                ", ".join(sorted(types)),
                ", ".join(sorted(self.current)),
            )
            self.current = types
            self.changed.set()
            self.changed = asyncio.Event()

    async def _reload(self, conn: asyncpg.Connection) -> None:
        self._set(await load_accepted_types(conn))

    def _lost(self) -> None:
        log.warning("keeping the accepted event types as they are until PostgreSQL answers")

    @classmethod
    @asynccontextmanager
    async def following(
        cls, settings: Settings, poll_seconds: float = POLL_SECONDS
    ) -> AsyncIterator[AcceptedTypes]:
        """Load the set once (raises if PostgreSQL does not answer), then keep it current
        until the block ends."""
        types = cls()
        conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            types._set(await load_accepted_types(conn))
        finally:
            await conn.close()
        task = asyncio.create_task(
            follow_channel(
                settings.database_url.get_secret_value(),
                CHANNEL,
                on_notify=lambda _: None,  # any change: the wake-up reloads the whole set
                on_connected=types._reload,
                on_lost=types._lost,
                poll_seconds=poll_seconds,
            )
        )
        try:
            yield types
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
