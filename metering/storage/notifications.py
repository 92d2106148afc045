"""Following a PostgreSQL notification channel from a long-lived process: one LISTEN
connection, reconnected after a loss, with a call for every notification and one for every
(re)connection, when notifications may have been missed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress

import asyncpg

from metering.storage.pool import TRANSIENT_DB_ERRORS

log = logging.getLogger("metering.notifications")


async def follow_channel(
    dsn: str,
    channel: str,
    *,
    on_notify: Callable[[str], None],
    on_connected: Callable[[asyncpg.Connection], Awaitable[None]],
    on_lost: Callable[[], None] = lambda: None,
    poll_seconds: float = 5.0,
) -> None:
    """Until cancelled: LISTEN on `channel`; `on_connected(conn)` runs after each (re)connect
    (reload what may have changed unseen) and again every `poll_seconds` as a safety net;
    `on_notify(payload)` runs for each notification; `on_lost()` when the connection is
    lost, before the next try `poll_seconds` later."""
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn)
            wake = asyncio.Event()

            def notified(*args: object, event: asyncio.Event = wake) -> None:
                on_notify(str(args[3]))
                event.set()

            await conn.add_listener(channel, notified)
            while not conn.is_closed():
                wake.clear()
                await on_connected(conn)
                with suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), poll_seconds)
        except asyncio.CancelledError:
            raise
        except TRANSIENT_DB_ERRORS as error:
            log.warning(
                "lost the %s notifications (%s: %s); trying again in %.0f s",
                channel,
                type(error).__name__,
                error,
                poll_seconds,
            )
        finally:
            if conn is not None:
                conn.terminate()
        on_lost()
        await asyncio.sleep(poll_seconds)
