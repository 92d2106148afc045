"""`metering`: the command line of contract section 6. Run `metering --help`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
from pydantic import ValidationError

from metering.config import Settings, load_settings
from metering.errors import AggregatorNotActive, MeteringError, RetentionTooShort
from metering.logs import configure_logging

T = TypeVar("T")
W = TypeVar("W", date, datetime)  # bounds of month_windows: dates or datetimes


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
    configure_logging(verbose)
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
        with _reaching_database(settings):
            conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            return await apply(conn)
        finally:
            await conn.close()

    try:
        applied = _run(main())
    except MeteringError as error:
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
    from metering.errors import DependencyUnavailable, InvalidEvent
    from metering.models import EventType

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
        types = [t.value for t in EventType]
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
    except DependencyUnavailable as error:
        raise DependencyDown.unreachable(
            f"cannot reach Kafka: {error.reason}", "METERING_KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    except InvalidEvent as error:
        raise click.ClickException(f"invalid event ({error.code}): {error.reason}") from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None


# ----------------------------------------------------------- aggregate
@cli.command()
@click.option(
    "--once",
    is_flag=True,
    help="Run one pass and exit (prints what it did). A pass takes the consumer's "
    "transactions up to METERING_AGGREGATOR_MAX_PASS_EVENTS events (default 1,000,000).",
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Port for /metrics (default METERING_METRICS_PORT).",
)
@click.pass_context
def aggregate(ctx: click.Context, once: bool, metrics_port: int | None) -> None:
    """Keep usage_aggregations up to date and publish limit crossings, until Ctrl-C.

    Each pass aggregates the events stored since the last one (durable watermark), in one
    transaction; a killed pass leaves nothing behind and is simply done again. One
    aggregator leads at a time: start a second one and it stands by, taking over as soon as
    the first stops or its PostgreSQL session ends. `--once` refuses to run while
    another aggregator leads (exit status 1: that one is doing the work).
    """
    from aggregator.service import run_aggregator

    settings = _settings(ctx)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    try:
        result = _run(run_aggregator(settings, once=once))
    except AggregatorNotActive as error:
        raise click.ClickException(
            f"{error}. It runs these passes already; stop it to run one by hand."
        ) from None
    if once and result is not None:
        click.echo(
            f"aggregated {result.events} events (transactions {result.from_xid}..{result.to_xid}); "
            f"{len(result.new_crossings)} new limit crossings"
        )
        if not result.caught_up:
            click.echo("more events are waiting beyond this pass's budget: run it again")


def _parse_when(value: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO date or time", param_hint=name) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@cli.command()
@click.option("--from", "start", required=True, help="Start (ISO date/time; UTC if no offset).")
@click.option("--to", "end", required=True, help="End, exclusive.")
@click.option("--org", "org_id", default=None, help="Only this organization.")
@click.option(
    "--period", type=click.Choice(["day", "month", "both"]), default="both", show_default=True
)
@click.pass_context
def reaggregate(ctx: click.Context, start: str, end: str, org_id: str | None, period: str) -> None:
    """Recompute usage_aggregations for a window from raw events (progress bar).

    Every day/month overlapping the window, in each organization's time zone, is rebuilt;
    running it twice changes nothing. Safe while the aggregator runs (they take turns).
    """
    from tqdm import tqdm

    from metering.storage.aggregates import AggregateStore

    settings = _settings(ctx)
    first, last = _parse_when(start, "--from"), _parse_when(end, "--to")
    if last <= first:
        raise click.BadParameter("--to must be after --from", param_hint="--to")
    org = _parse_org(org_id) if org_id else None
    periods = ["day", "month"] if period == "both" else [period]
    windows = month_windows(first, last)

    async def recompute(pool: Any) -> int:
        from metering.storage.retention import raw_events_from

        store = AggregateStore(pool)
        written = 0
        horizon = await raw_events_from(pool)
        if horizon is not None and first < horizon:
            raise click.ClickException(
                f"raw events before {horizon.isoformat()} were dropped by retention; "
                "re-aggregating that window would erase its aggregates"
            )
        with tqdm(total=len(windows) * len(periods), unit="window", file=sys.stderr) as bar:
            for window_start, window_end in windows:
                for name in periods:
                    bar.set_description(f"{name} {window_start:%Y-%m}")
                    written += await store.reaggregate(name, window_start, window_end, org)
                    bar.update()
        return written

    # no statement timeout: one month of a big table can take minutes
    written = _run(_with_pool(settings, recompute, command_timeout=None))
    click.echo(f"recomputed {written} aggregate rows for {first.isoformat()} .. {last.isoformat()}")


def month_windows(first: W, last: W) -> list[tuple[W, W]]:
    """[first, last) cut at each calendar month's start: the unit of work (and of progress)
    of `reaggregate` and `reconcile`. Dates or datetimes; a datetime keeps its zone."""
    windows: list[tuple[W, W]] = []
    cursor = first
    while cursor < last:
        month_start = cursor.replace(day=1)
        if isinstance(month_start, datetime):
            month_start = month_start.replace(hour=0, minute=0, second=0, microsecond=0)
        following = (month_start + timedelta(days=32)).replace(day=1)
        windows.append((cursor, min(following, last)))
        cursor = min(following, last)
    return windows


@cli.command()
@click.option("--from", "start", default=None, help="First period start (default: 400 days ago).")
@click.option("--to", "end", default=None, help="Period starts before this (default: tomorrow).")
@click.option("--org", "org_id", default=None, help="Only this organization (fast: by index).")
@click.pass_context
def reconcile(ctx: click.Context, start: str | None, end: str | None, org_id: str | None) -> None:
    """Recompute aggregates from usage_events independently and compare with the stored ones.

    Works month by month (progress bar on stderr), each month in one consistent snapshot.
    Exits 0 when every number adds up, 1 listing each (org, type, period) that differs
    (`metering reaggregate` over that window repairs them), 3 when PostgreSQL cannot be
    reached or has no metering schema.
    """
    from tqdm import tqdm

    from metering.storage.aggregates import AggregateStore

    settings = _settings(ctx)
    today = datetime.now(UTC).date()
    first = _parse_when(start, "--from").date() if start else today - timedelta(days=400)
    last = _parse_when(end, "--to").date() if end else today + timedelta(days=1)
    if last <= first:
        raise click.BadParameter("--to must be after --from", param_hint="--to")
    org = _parse_org(org_id) if org_id else None
    windows = month_windows(first, last)

    async def compare(pool: Any) -> list[Any]:
        store = AggregateStore(pool)
        found: list[Any] = []
        with tqdm(total=len(windows), unit="month", file=sys.stderr) as bar:
            for window_start, window_end in windows:
                bar.set_description(f"reconcile {window_start:%Y-%m}")
                found.extend(await store.reconcile(window_start, window_end, org))
                bar.update()
        return found

    # no statement timeout: one month of a big table can take minutes
    differences = _run(_with_pool(settings, compare, command_timeout=None))
    if not differences:
        scope = f" for {org}" if org else ""
        click.echo(f"reconciled {first} .. {last}{scope}: every aggregate matches usage_events")
        return
    rows = [
        [
            str(r["org_id"]),
            r["event_type"],
            r["period"],
            str(r["period_start"]),
            _fmt(r["expected_value"]),
            _fmt(r["stored_value"]),
            _fmt(r["expected_events"]),
            _fmt(r["stored_events"]),
        ]
        for r in differences
    ]
    _table(
        ["org", "type", "period", "start", "expected", "stored", "exp. events", "stored events"],
        rows,
    )
    click.echo(f"{len(differences)} aggregates differ from usage_events", err=True)
    sys.exit(1)


@cli.command()
@click.argument("org")
@click.option("--period", type=click.Choice(["day", "month"]), default="month", show_default=True)
@click.option("--from", "start", default=None, help="Period starts from this date.")
@click.option("--to", "end", default=None, help="Period starts before this date.")
@click.option("--type", "event_type", default=None, help="Only this event type.")
@click.pass_context
def usage(
    ctx: click.Context,
    org: str,
    period: str,
    start: str | None,
    end: str | None,
    event_type: str | None,
) -> None:
    """Print an organization's aggregated usage as a table."""
    from metering.storage.reads import ReadStore

    settings = _settings(ctx)
    org_id = _parse_org(org)
    first = _parse_when(start, "--from").date() if start else None
    last = _parse_when(end, "--to").date() if end else None

    async def main() -> list[Any]:
        return await _with_pool(
            settings,
            lambda pool: ReadStore(pool).usage(org_id, period, first, last, event_type),
        )

    rows = _run(main())
    if not rows:
        click.echo(f"no {period} usage for {org_id}")
        return
    _table(
        ["period_start", "event_type", "value", "events", "updated_at"],
        [
            [
                str(r["period_start"]),
                r["event_type"],
                _fmt(r["value"]),
                str(r["event_count"]),
                r["updated_at"].isoformat(timespec="seconds"),
            ]
            for r in rows
        ],
    )


@cli.command()
@click.argument("org")
@click.argument("feature")
@click.option("--quantity", default="1", show_default=True, help="Quantity requested.")
@click.pass_context
def check(ctx: click.Context, org: str, feature: str, quantity: str) -> None:
    """Print the access check of FEATURE for ORG (limit, used, remaining, allowed).

    Exits 0 when allowed, 1 when not, 2 for an unknown feature, 3 when PostgreSQL cannot
    be reached.
    """
    import asyncpg

    from metering.storage.aggregates import AggregateStore

    settings = _settings(ctx)
    org_id = _parse_org(org)
    try:
        requested = Decimal(quantity)
    except ArithmeticError:
        raise click.BadParameter(f"{quantity!r} is not a number", param_hint="--quantity") from None

    async def main() -> dict[str, Any]:
        return await _with_pool(
            settings, lambda pool: AggregateStore(pool).check_access(org_id, feature, requested)
        )

    try:
        result = _run(main())
    except asyncpg.NoDataFoundError:
        click.echo(f"Error: unknown feature key {feature!r}", err=True)
        sys.exit(2)
    _table(
        ["key", "value"],
        [[k, json.dumps(v) if isinstance(v, dict) else _fmt(v)] for k, v in result.items()],
    )
    sys.exit(0 if result.get("allowed") else 1)


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


async def _with_pool(
    settings: Settings,
    use: Callable[[Any], Awaitable[T]],
    *,
    command_timeout: float | None = 60,
) -> T:
    """Open a pool, run `use(pool)`, always close the pool. A database that cannot be
    reached or is not migrated ends the command with a message saying what to do."""
    import asyncpg

    from metering.storage.pool import TRANSIENT_DB_ERRORS, create_pool

    with _reaching_database(settings):
        pool = await create_pool(settings, command_timeout=command_timeout)
    where = _database_location(settings)
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
def _reaching_database(settings: Settings) -> Iterator[None]:
    """Around connecting: a server that is down, refuses us, or lacks the database becomes
    DependencyDown saying what to do."""
    import asyncpg

    from metering.storage.pool import TRANSIENT_DB_ERRORS

    where = _database_location(settings)
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


def _database_location(settings: Settings) -> str:
    """host:port/database of METERING_DATABASE_URL, without the credentials."""
    parts = urlsplit(settings.database_url.get_secret_value())
    return f"{parts.hostname or 'localhost'}:{settings.database_port}/{settings.database_name}"


def _parse_org(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID", param_hint="ORG") from None


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    click.echo("  ".join("-" * w for w in widths))
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


# ------------------------------------------------------------ retention
@cli.command()
@click.option(
    "--keep",
    required=True,
    help="How much raw history to keep: 13mo, 400d ... (more than the lateness window plus a day, "
    "METERING_LATENESS_WINDOW, so late duplicates are still recognised)",
)
@click.option("--dry-run", is_flag=True, help="Only print what would be dropped.")
@click.pass_context
def retention(ctx: click.Context, keep: str, dry_run: bool) -> None:
    """Drop monthly partitions of usage_events older than --keep (aggregates are kept).

    The month containing the horizon is kept whole. Dedupe keys of dropped events go too,
    so a horizon inside the lateness window is refused: a late copy of a dropped event
    would be accepted and counted again.
    Afterwards `reaggregate` refuses windows before the horizon.
    """
    from metering.storage.retention import apply_retention

    settings = _settings(ctx)
    now = datetime.now(UTC)
    keep_from = _keep_from(keep, now)

    async def main() -> list[Any]:
        return await _with_pool(
            settings,
            lambda pool: apply_retention(
                pool, keep_from, dry_run, now=now, lateness_window=settings.lateness_window
            ),
        )

    try:
        dropped = _run(main())
    except RetentionTooShort as error:
        raise click.BadParameter(error.reason, param_hint="--keep") from None
    verb = "would drop" if dry_run else "dropped"
    for row in dropped:
        click.echo(
            f"{verb} {row['partition_name']} ({row['range_start']:%Y-%m-%d} .. "
            f"{row['range_end']:%Y-%m-%d}, {row['events']} events)"
        )
    click.echo(f"{verb} {len(dropped)} partitions; raw events kept from {keep_from:%Y-%m-%d}")


def _keep_from(keep: str, now: datetime) -> datetime:
    import re

    match = re.fullmatch(r"(\d+)(mo|d)", keep.strip())
    if match is None:
        raise click.BadParameter(
            "use a number of months or days, e.g. 13mo or 400d", param_hint="--keep"
        )
    amount = int(match.group(1))
    if match.group(2) == "d":
        return now - timedelta(days=amount)
    index = now.year * 12 + now.month - 1 - amount
    return now.replace(
        year=index // 12, month=index % 12 + 1, day=1, hour=0, minute=0, second=0, microsecond=0
    )


# ---------------------------------------------------------------- serve
@cli.command()
@click.option("--port", type=int, default=None, help="Port (default METERING_HTTP_PORT, 8080).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Server processes sharing the port (each with its own pool and producer).",
)
@click.pass_context
def serve(ctx: click.Context, port: int | None, host: str, workers: int) -> None:
    """Serve the HTTP API (uvicorn; SIGTERM/Ctrl-C finish in-flight requests, then stop).

    OpenAPI at /openapi.json; every /v1 call needs a key from `metering keys create`.
    Limits per process: headers within 10 s of connecting and at most 64 KiB, a body within
    30 s and at most ~16 MiB, 5 s idle between requests, 4,000 connections
    (metering/api/server.py; put a reverse proxy in front for per-client limits).
    """
    import uvicorn

    from metering.api.app import create_app
    from metering.api.server import configure, raise_descriptor_limit, server_options

    settings = _settings(ctx)
    configure(settings)
    raise_descriptor_limit()
    common: dict[str, Any] = {
        "host": host,
        "port": port or settings.http_port,
        "log_level": "warning",
        "timeout_graceful_shutdown": 20,
        "access_log": False,
        **server_options(),
    }
    if workers > 1:
        uvicorn.run(
            "metering.api.app:create_app_from_environment",
            factory=True,
            workers=workers,
            **common,
        )
        return
    uvicorn.run(create_app(settings), **common)


# ----------------------------------------------------------------- keys
@cli.group()
def keys() -> None:
    """API keys: create (printed once), list, revoke. Only hashes are stored."""


@keys.command("create")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(["ingest", "read", "admin"]),
    help="Repeat for several scopes.",
)
@click.option("--org", "org_id", default=None, help="Bind the key to one organization.")
@click.option("--name", default="", help="A note to recognise the key by.")
@click.pass_context
def keys_create(ctx: click.Context, scopes: tuple[str, ...], org_id: str | None, name: str) -> None:
    """Create a key and print it once: store it now, it cannot be shown again."""
    from metering.storage.keys import KeyStore

    settings = _settings(ctx)
    org = _parse_org(org_id) if org_id else None

    async def main() -> str:
        key, _ = await _with_pool(
            settings, lambda pool: KeyStore(pool).create(sorted(set(scopes)), org, name)
        )
        return key

    click.echo(_run(main()))


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List keys (prefix, scopes, organization, state); never the secret."""
    from metering.storage.keys import KeyStore

    settings = _settings(ctx)

    async def main() -> list[Any]:
        return await _with_pool(settings, lambda pool: KeyStore(pool).list())

    found = _run(main())
    if not found:
        click.echo("no keys; create one with `metering keys create --scope read`")
        return
    _table(
        ["prefix", "scopes", "org", "name", "created", "state"],
        [
            [
                k.prefix,
                ",".join(sorted(k.scopes)),
                str(k.org_id or "any"),
                k.name,
                k.created_at.isoformat(timespec="seconds"),
                "revoked" if k.revoked_at else "active",
            ]
            for k in found
        ],
    )


@keys.command("revoke")
@click.argument("prefix")
@click.pass_context
def keys_revoke(ctx: click.Context, prefix: str) -> None:
    """Revoke the key with PREFIX (see `keys list`); it stops working at once."""
    from metering.storage.keys import KeyStore

    settings = _settings(ctx)

    async def main() -> bool:
        return await _with_pool(settings, lambda pool: KeyStore(pool).revoke(prefix))

    if not _run(main()):
        raise click.ClickException(f"no active key with prefix {prefix!r}")
    click.echo(f"revoked {prefix}")


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
