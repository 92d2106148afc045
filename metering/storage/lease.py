"""The aggregator's lead: one aggregator at a time runs passes and publishes crossings.

A session advisory lock held on a connection of its own (not a pool's: asyncpg resets
pooled connections with pg_advisory_unlock_all()). PostgreSQL releases it when that
session ends, so a crashed or cut-off aggregator frees the lead by itself.
"""

from __future__ import annotations

import asyncio
import os
import socket

import asyncpg

from metering.config import Settings
from metering.errors import AggregatorNotActive

# pg_advisory_lock's key for "the aggregator of this database" (advisory locks are scoped
# to the current database; any constant would do: these are the 64 bits of 'metering').
AGGREGATOR_LOCK_KEY = 0x6D65746572696E67
TRY_LOCK = "SELECT pg_try_advisory_lock($1)"
WAIT_FOR_LOCK = "SELECT pg_advisory_lock($1)"
STILL_HELD = """
SELECT EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                 AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1)
"""
HOLDER = """
SELECT a.application_name, host(a.client_addr) AS client_addr
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
"""


class AggregatorLease:
    """The lead, taken with `try_acquire` and checked with `check` before each pass."""

    def __init__(self, settings: Settings) -> None:
        self._dsn = settings.database_url.get_secret_value()
        self.name = f"metering aggregate on {socket.gethostname()} (pid {os.getpid()})"
        self._conn: asyncpg.Connection | None = None
        # The pass loop and the publishing task both check the lead; one connection runs
        # one query at a time (a second would fail with InterfaceError, read as a lost lead).
        self._checking = asyncio.Lock()

    async def try_acquire(self) -> bool:
        """Take the lead if it is free; False when another aggregator holds it. Connection
        errors propagate (the caller retries them as PostgreSQL being down)."""
        await self._connect()
        assert self._conn is not None
        held: bool = await self._conn.fetchval(TRY_LOCK, AGGREGATOR_LOCK_KEY)
        return held

    async def _connect(self) -> None:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._dsn,
                # A standby waits for the lock as long as the leader lives. The server probes
                # an idle lock session every 10 s (3 probes 5 s apart), so a leader whose
                # host vanished frees the lead within ~25 s, not after the kernel's 2 hours.
                server_settings={
                    "application_name": self.name[:63],
                    "lock_timeout": "0",
                    "statement_timeout": "0",
                    "tcp_keepalives_idle": "10",
                    "tcp_keepalives_interval": "5",
                    "tcp_keepalives_count": "3",
                },
                command_timeout=None,
            )

    async def wait(self) -> None:
        """Wait until the lead is free and take it: PostgreSQL grants the lock the moment
        the holder's session ends. Connection errors propagate (retry them)."""
        await self._connect()
        assert self._conn is not None
        await self._conn.execute(WAIT_FOR_LOCK, AGGREGATOR_LOCK_KEY)

    async def holder(self) -> str:
        """Who holds the lead, for the log ("unknown" if it was just released)."""
        assert self._conn is not None
        row = await self._conn.fetchrow(HOLDER, AGGREGATOR_LOCK_KEY)
        if row is None:
            return "unknown (just released)"
        return f"{row['application_name']} from {row['client_addr'] or 'local socket'}"

    async def check(self) -> None:
        """Raise AggregatorNotActive unless this process still holds the lead (its lock
        session is alive). Called before each pass: a pass that starts after the lead was
        lost would still be correct (passes serialise on the watermark row), but the
        crossings it records are for the active aggregator to publish."""
        async with self._checking:
            await self._check()

    async def _check(self) -> None:
        if self._conn is None or self._conn.is_closed():
            raise AggregatorNotActive("lost the lead: its PostgreSQL session ended")
        try:
            held = bool(await self._conn.fetchval(STILL_HELD, AGGREGATOR_LOCK_KEY))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise AggregatorNotActive(
                f"lost the lead: its PostgreSQL session ended ({type(error).__name__})"
            ) from None
        if not held:
            raise AggregatorNotActive("the aggregator's lock is no longer held by this process")

    async def release(self) -> None:
        """End the lock session, which releases the lead. A session that will not close
        cleanly (a query still being cancelled, the server gone) is cut off instead, and the
        server releases the lock when it notices; only a cancellation propagates."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()
        except asyncio.CancelledError:
            conn.terminate()
            raise
