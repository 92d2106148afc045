"""Shared by every command: the root group, settings, running coroutines, database access and
tables."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from pydantic import ValidationError

from metering.config import Settings, load_settings
from metering.logs import configure_logging

T = TypeVar("T")


def settings_of(ctx: click.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coroutine)
    except KeyboardInterrupt:
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Usage metering: Kafka in, Postgres out, every usage event stored exactly once.

    Configuration comes from METERING_* environment variables (see README); the defaults
    match `metering dev up`.
    """
    configure_logging(verbose)
    try:
        ctx.obj = load_settings()
    except ValidationError as error:
        raise click.ClickException(f"bad configuration in the environment:\n{error}") from None


def parse_when(value: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO date or time", param_hint=name) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class DependencyDown(click.ClickException):
    """PostgreSQL or Kafka could not be reached, refused us, or PostgreSQL lacks the schema:
    exit status 3, so that scripts can tell it from a command's own answers (1 and 2)."""

    exit_code = 3

    @classmethod
    def unreachable(cls, problem: str, address_variable: str) -> DependencyDown:
        """`problem`, and where to look: the local services, or the configured address."""
        return cls(
            f"{problem}. Is it running? (`metering dev status` shows the local one; the "
            f"address is {address_variable})"
        )


async def with_pool(
    settings: Settings,
    use: Callable[[Any], Awaitable[T]],
    *,
    command_timeout: float | None = 60,
) -> T:
    """Open a pool, run `use(pool)`, always close the pool. A database that cannot be
    reached or is not migrated ends the command with a message saying what to do."""
    import asyncpg

    from metering.storage.pool import TRANSIENT_DB_ERRORS, create_pool

    with reaching_database(settings):
        pool = await create_pool(settings, command_timeout=command_timeout)
    where = database_location(settings)
    try:
        return await use(pool)
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError) as error:
        raise DependencyDown(
            f"the database at {where} has no metering schema ({error}): run `metering migrate`"
        ) from None
    except TRANSIENT_DB_ERRORS as error:
        raise DependencyDown(
            f"lost PostgreSQL at {where}: {error or type(error).__name__}. Every step of a "
            "command is one transaction, so running it again is safe"
        ) from None
    finally:
        await pool.close()


@contextlib.contextmanager
def reaching_database(settings: Settings) -> Iterator[None]:
    """Around connecting: a server that is down, refuses us, or lacks the database becomes
    DependencyDown saying what to do."""
    import asyncpg

    from metering.storage.pool import TRANSIENT_DB_ERRORS

    where = database_location(settings)
    refused: tuple[type[BaseException], ...] = (
        *TRANSIENT_DB_ERRORS,
        asyncpg.InvalidAuthorizationSpecificationError,
    )
    try:
        yield
    except asyncpg.InvalidCatalogNameError as error:
        raise DependencyDown(
            f"{error} at {where}: `metering dev up` creates the local one, then "
            "`metering migrate`; elsewhere create it, or fix METERING_DATABASE_URL"
        ) from None
    except refused as error:
        raise DependencyDown.unreachable(
            f"cannot connect to PostgreSQL at {where}: {error or type(error).__name__}",
            "METERING_DATABASE_URL",
        ) from None


def database_location(settings: Settings) -> str:
    """host:port/database of METERING_DATABASE_URL, without the credentials."""
    parts = urlsplit(settings.database_url.get_secret_value())
    return f"{parts.hostname or 'localhost'}:{settings.database_port}/{settings.database_name}"


def parse_org(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID", param_hint="ORG") from None


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)
    return str(value)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    click.echo("  ".join("-" * w for w in widths))
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
