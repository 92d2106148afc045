"""Connection pools and the classification of database errors."""

from __future__ import annotations

import logging

import asyncpg
from asyncpg.exceptions._base import DataError as ArgumentEncodingError

from metering.config import Settings

# Errors after which the same work may succeed if tried again: the server went away,
# restarted, refused connections for a while, or picked us as a deadlock victim.
# asyncpg's refusal to encode a query argument (a value of the wrong type or range) is an
# InterfaceError, as a lost connection is, but retrying it can never succeed.
PERMANENT_DB_ERRORS: tuple[type[BaseException], ...] = (ArgumentEncodingError,)
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


class OneLineOutageWarnings(logging.Filter):
    """asyncpg's pool logs a full traceback (~40 lines) each time it fails to reconnect its
    idle connection while PostgreSQL is down, burying our own warning that says what is
    retried and that nothing is committed. For a transient error (TRANSIENT_DB_ERRORS) this
    keeps asyncpg's warning on one line with the error appended; any other error keeps its
    traceback, since that one is worth reading."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, TRANSIENT_DB_ERRORS):
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {error})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def shorten_outage_logs() -> None:
    """Install OneLineOutageWarnings on asyncpg's pool logger (once; safe to call again)."""
    logger = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, OneLineOutageWarnings) for f in logger.filters):
        logger.addFilter(OneLineOutageWarnings())


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
