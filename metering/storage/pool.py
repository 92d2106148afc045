"""Connection pools and the classification of database errors."""

from __future__ import annotations

import asyncpg

from metering.config import Settings

# Errors after which the same work may succeed if tried again: the server went away,
# restarted, refused connections for a while, or picked us as a deadlock victim.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.ConnectionFailureError,
)


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """Open a pool to `METERING_DATABASE_URL`. Raises a transient error if Postgres is down."""
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=min_size,
        max_size=max_size,
        command_timeout=60,
        server_settings={"application_name": "metering"},
    )
    assert pool is not None
    return pool
