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
from contextlib import asynccontextmanager, suppress

import asyncpg

from metering.config import Settings
from metering.models import SEEDED_TYPES
from metering.storage.pool import TRANSIENT_DB_ERRORS

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

    async def _follow(self, settings: Settings, poll_seconds: float) -> None:
        dsn = settings.database_url.get_secret_value()
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(dsn)
                wake = asyncio.Event()
                await conn.add_listener(CHANNEL, lambda *_, event=wake: event.set())
                while not conn.is_closed():
                    wake.clear()
                    self._set(await load_accepted_types(conn))
                    with suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), poll_seconds)
            except asyncio.CancelledError:
                raise
            except TRANSIENT_DB_ERRORS as error:
                log.warning(
                    "cannot follow meter changes (%s: %s); keeping the accepted types "
                    "as they are and trying again in %.0f s",
                    type(error).__name__,
                    error,
                    poll_seconds,
                )
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(poll_seconds)

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
        task = asyncio.create_task(types._follow(settings, poll_seconds))
        try:
            yield types
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
