"""`metering`: the command line of contract section 6. Run `metering --help`."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import uuid
from collections.abc import Coroutine
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from metering.config import Settings, load_settings
from metering.errors import MeteringError

T = TypeVar("T")


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING if not verbose else logging.DEBUG)
    try:
        ctx.obj = load_settings()
    except ValidationError as error:
        raise click.ClickException(f"bad configuration in the environment:\n{error}") from None


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

    settings = _settings(ctx)
    services = DevServices(settings)
    try:
        services.start_postgres()
        services.start_kafka()
        created = _run(ensure_topics(settings))
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

    services = DevServices(_settings(ctx))
    stopped_kafka = services.stop_kafka()
    stopped_pg = services.stop_postgres()
    click.echo(f"kafka: {'stopped' if stopped_kafka else 'was not running'}")
    click.echo(f"postgres: {'stopped' if stopped_pg else 'was not running'}")


@dev.command("status")
@click.pass_context
def dev_status(ctx: click.Context) -> None:
    """Say what runs where; exit 1 if a service is down."""
    from metering.devenv.services import DevServices

    if not _print_status(DevServices(_settings(ctx))):
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

    settings = _settings(ctx)

    async def main() -> list[str]:
        conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            return await apply(conn)
        finally:
            await conn.close()

    try:
        applied = _run(main())
    except (MeteringError, OSError) as error:
        raise click.ClickException(str(error)) from None
    if applied:
        for name in applied:
            click.echo(f"applied {name}")
    else:
        click.echo("database is up to date")


# ------------------------------------------------------------- consume
@cli.command()
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Port for /metrics (default METERING_METRICS_PORT).",
)
@click.pass_context
def consume(ctx: click.Context, metrics_port: int | None) -> None:
    """Write usage events from Kafka to Postgres, exactly once, until Ctrl-C / SIGTERM.

    Invalid messages go to the dead-letter topic with their reason. While Postgres or
    Kafka is down it waits and retries; it never commits offsets past unstored events.
    """
    from consumers.app import run_consumer

    settings = _settings(ctx)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    _run(run_consumer(settings))


# ----------------------------------------------------------------- send
@cli.command()
@click.option("--org", "org_id", help="Organization UUID (single event).")
@click.option("--type", "event_type", default="api_call", show_default=True, help="Event type.")
@click.option("--quantity", default="1", show_default=True, help="Quantity (exact decimal).")
@click.option("--user", "user_id", default=None, help="User UUID (required for user_active).")
@click.option("--id", "event_id", default=None, help="Idempotency key (default: a new UUIDv7).")
@click.option("--at", "occurred_at", default=None, help="RFC 3339 time (default: now).")
@click.option("--count", type=int, default=None, help="Send N synthetic events instead of one.")
@click.option("--orgs", type=int, default=10, show_default=True, help="Synthetic: number of orgs.")
@click.option(
    "--duplicates",
    type=float,
    default=0.0,
    show_default=True,
    help="Synthetic: fraction of events re-sent with the same id.",
)
@click.option(
    "--seed", type=int, default=None, help="Synthetic: random seed (same seed, same events)."
)
@click.pass_context
def send(
    ctx: click.Context,
    org_id: str | None,
    event_type: str,
    quantity: str,
    user_id: str | None,
    event_id: str | None,
    occurred_at: str | None,
    count: int | None,
    orgs: int,
    duplicates: float,
    seed: int | None,
) -> None:
    """Publish usage events to Kafka: one (--org ...) or N synthetic (--count N).

    Each event is validated before it is sent, so a bad one fails here with its reason.
    """
    from metering.client import UsageClient
    from metering.errors import InvalidEvent

    settings = _settings(ctx)
    if count is None and org_id is None:
        raise click.UsageError("give --org for one event, or --count N for synthetic events")

    async def one() -> None:
        async with UsageClient(settings) as client:
            event = client.build(
                org_id=org_id or "",
                type=event_type,
                quantity=Decimal(quantity),
                user_id=user_id,
                id=event_id,
                occurred_at=datetime.fromisoformat(occurred_at) if occurred_at else None,
            )
            await client.send_event(event)
            click.echo(
                f"sent {event.type.value} id={event.id} org={event.org_id} "
                f"quantity={event.quantity}"
            )

    async def many(n: int) -> None:
        from tqdm import tqdm

        rng = random.Random(seed)
        org_ids = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(orgs)]
        users = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(50)]
        types = [
            "api_call",
            "record_created",
            "automation_run",
            "schedule_executed",
            "ai_tokens_used",
            "storage_used",
            "user_active",
        ]
        sent_ids: list[tuple[uuid.UUID, str]] = []
        async with UsageClient(settings, linger_ms=20) as client:
            with tqdm(total=n, unit="ev", desc="sending", file=sys.stderr) as bar:
                for _ in range(n):
                    if sent_ids and rng.random() < duplicates:
                        org, known_id = rng.choice(sent_ids)
                        event = client.build(org_id=org, type="api_call", id=known_id)
                    else:
                        kind = rng.choice(types)
                        event = client.build(
                            org_id=rng.choice(org_ids),
                            type=kind,
                            quantity=rng.randint(1, 5_000_000)
                            if kind == "storage_used"
                            else rng.randint(1, 20),
                            user_id=rng.choice(users) if kind == "user_active" else None,
                        )
                        sent_ids.append((event.org_id, event.id))
                    await client.enqueue(event)
                    bar.update()
                await client.flush()
        click.echo(f"sent {n} events for {orgs} organizations", err=True)

    try:
        _run(one() if count is None else many(count))
    except InvalidEvent as error:
        raise click.ClickException(f"invalid event ({error.code}): {error.reason}") from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None


# ------------------------------------------------------------------ run
@cli.command()
@click.option(
    "--demo", is_flag=True, help="Also publish sample events and say how to look at them."
)
@click.pass_context
def run(ctx: click.Context, demo: bool) -> None:
    """Run every process of the service in one process tree with one log, until Ctrl-C."""
    from metering.demo import publish_samples
    from metering.supervisor import service_children, supervise

    settings = _settings(ctx)

    async def main() -> int:
        after = publish_samples(settings) if demo else None
        return await supervise(service_children(settings), after_start=after)

    sys.exit(_run(main()))


def main() -> None:
    cli(prog_name="metering")


if __name__ == "__main__":
    main()
