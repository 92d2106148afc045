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


async def create_pool(
    settings: Settings,
    *,
    min_size: int = 1,
    max_size: int = 4,
    role: str | None = None,
    command_timeout: float | None = 60,
) -> asyncpg.Pool:
    """Open a pool to `METERING_DATABASE_URL`. Raises a transient error if Postgres is down.

    With `role`, every connection acts as that role (`SET ROLE`; `RESET ALL` does not undo
    it), so a process holds only the privileges of its job (migration 004). A statement
    running longer than `command_timeout` seconds raises TimeoutError; the services keep
    the default, batch commands over big windows (reaggregate, reconcile) pass None.
    """

    async def become(conn: asyncpg.Connection) -> None:
        if role is not None:
            await conn.execute(f"SET ROLE {role}")  # role names are constants of this codebase

    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout,
        server_settings={"application_name": "metering"},
        init=become,
    )
    assert pool is not None
    return pool
