"""`metering dev up|down|status` and `metering migrate`: the local services and the schema."""

from __future__ import annotations

import sys
from typing import Any

import click

from metering.cli.common import cli, reaching_database, run_sync, settings_of
from metering.errors import MeteringError


# ------------------------------------------------------------------ dev
@cli.group()
def dev() -> None:
    """Local Kafka (KRaft, from Maven Central) and PostgreSQL (Debian), no Docker."""


@dev.command("up")
@click.pass_context
def dev_up(ctx: click.Context) -> None:
    """Start Kafka and PostgreSQL in the background, create the database and topics.

    Harmless when they already run. Data, logs and pid files live in METERING_DEV_DIR
    (default .dev/); ports come from METERING_KAFKA_BOOTSTRAP_SERVERS and
    METERING_DATABASE_URL.
    """
    from metering.devenv.services import DevServices
    from metering.topics import ensure_topics

    settings = settings_of(ctx)
    services = DevServices(settings)
    try:
        services.start_postgres()
        services.start_kafka()
        created = run_sync(ensure_topics(settings))
    except MeteringError as error:
        raise click.ClickException(str(error)) from None
    for name in created:
        click.echo(f"created topic {name}", err=True)
    _print_status(services)


@dev.command("down")
@click.pass_context
def dev_down(ctx: click.Context) -> None:
    """Stop the Kafka and PostgreSQL that `dev up` started (data is kept)."""
    from metering.devenv.services import DevServices

    services = DevServices(settings_of(ctx))
    stopped_kafka = services.stop_kafka()
    stopped_pg = services.stop_postgres()
    click.echo(f"kafka: {'stopped' if stopped_kafka else 'was not running'}")
    click.echo(f"postgres: {'stopped' if stopped_pg else 'was not running'}")


@dev.command("status")
@click.pass_context
def dev_status(ctx: click.Context) -> None:
    """Say what runs where; exit 1 if a service is down."""
    from metering.devenv.services import DevServices

    if not _print_status(DevServices(settings_of(ctx))):
        sys.exit(1)


def _print_status(services: Any) -> bool:
    all_up = True
    for status in services.status():
        state = f"running (pid {status.pid})" if status.running else "stopped"
        click.echo(f"{status.name:9} {state:22} {status.address:18} log: {status.detail}")
        all_up = all_up and status.running
    return all_up


# ------------------------------------------------------------- migrate
@cli.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Apply the SQL migrations not applied yet (each in one transaction). Safe to re-run."""
    import asyncpg

    from metering.storage.migrations import migrate as apply

    settings = settings_of(ctx)

    async def main() -> list[str]:
        with reaching_database(settings):
            conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            return await apply(conn)
        finally:
            await conn.close()

    try:
        applied = run_sync(main())
    except MeteringError as error:
        raise click.ClickException(str(error)) from None
    if applied:
        for name in applied:
            click.echo(f"applied {name}")
    else:
        click.echo("database is up to date")
