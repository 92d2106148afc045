"""Commands on the data: `send`, `usage`, `check`, `reaggregate`, `reconcile`, `retention`."""

from __future__ import annotations

import json
import random
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import click

from metering.calendar import keep_from, month_windows
from metering.cli.common import (
    DependencyDown,
    cli,
    fmt,
    parse_org,
    parse_when,
    print_table,
    run_sync,
    settings_of,
    with_pool,
)
from metering.errors import RetentionTooShort


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

    settings = settings_of(ctx)
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
                f"sent {event.type} id={event.id} org={event.org_id} quantity={event.quantity}"
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
        run_sync(one() if count is None else many(count))
    except DependencyUnavailable as error:
        raise DependencyDown.unreachable(
            f"cannot reach Kafka: {error.reason}", "METERING_KAFKA_BOOTSTRAP_SERVERS"
        ) from None
    except InvalidEvent as error:
        raise click.ClickException(f"invalid event ({error.code}): {error.reason}") from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None


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

    from aggregator.store import AggregateStore

    settings = settings_of(ctx)
    first, last = parse_when(start, "--from"), parse_when(end, "--to")
    if last <= first:
        raise click.BadParameter("--to must be after --from", param_hint="--to")
    org = parse_org(org_id) if org_id else None
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
    written = run_sync(with_pool(settings, recompute, command_timeout=None))
    click.echo(f"recomputed {written} aggregate rows for {first.isoformat()} .. {last.isoformat()}")


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

    from aggregator.store import AggregateStore

    settings = settings_of(ctx)
    today = datetime.now(UTC).date()
    first = parse_when(start, "--from").date() if start else today - timedelta(days=400)
    last = parse_when(end, "--to").date() if end else today + timedelta(days=1)
    if last <= first:
        raise click.BadParameter("--to must be after --from", param_hint="--to")
    org = parse_org(org_id) if org_id else None
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
    differences = run_sync(with_pool(settings, compare, command_timeout=None))
    if not differences:
        scope = f" for {org}" if org else ""
        click.echo(f"reconciled {first} .. {last}{scope}: every aggregate matches usage_events")
        return
    rows = [
        [
            str(r["org_id"]),
            r["event_type"] + (f" {r['dimensions']}" if r.get("dimensions", "{}") != "{}" else ""),
            r["period"],
            str(r["period_start"]),
            fmt(r["expected_value"]),
            fmt(r["stored_value"]),
            fmt(r["expected_events"]),
            fmt(r["stored_events"]),
        ]
        for r in differences
    ]
    print_table(
        [
            "org",
            "type or meter",
            "period",
            "start",
            "expected",
            "stored",
            "exp. events",
            "stored events",
        ],
        rows,
    )
    click.echo(f"{len(differences)} aggregates differ from usage_events", err=True)
    sys.exit(1)


@cli.command()
@click.argument("org")
@click.option("--period", type=click.Choice(["day", "month"]), default="month", show_default=True)
@click.option("--from", "start", default=None, help="Period (window) starts from this date.")
@click.option("--to", "end", default=None, help="Period (window) starts before this date.")
@click.option("--type", "event_type", default=None, help="Only this event type.")
@click.option("--meter", default=None, help="One meter's usage by window and dimensions.")
@click.option(
    "--window", type=click.Choice(["hour", "day", "month"]), default="day", show_default=True
)
@click.option("--group-by", default=None, help="With --meter: dimensions to keep (a,b).")
@click.option("--tz", default=None, help="With --meter: an IANA zone (default the org's).")
@click.option("--filter", "filters", multiple=True, metavar="DIMENSION=VALUE")
@click.option("--csv", "as_csv", is_flag=True, help="With --meter: print CSV.")
@click.pass_context
def usage(
    ctx: click.Context,
    /,
    org: str,
    period: str,
    start: str | None,
    end: str | None,
    event_type: str | None,
    **meter_options: Any,
) -> None:
    """Print an organization's aggregated usage as a table: the v1 day or month totals per
    event type, or with --meter one meter's usage by --window (hour, day, month, in --tz)
    and dimensions, exactly as `GET /v1/orgs/{org}/meters/{key}/usage` answers."""
    from metering.storage.reads import ReadStore

    settings = settings_of(ctx)
    org_id = parse_org(org)
    if meter_options["meter"]:
        from metering.cli.meters import print_meter_usage

        print_meter_usage(settings, org_id, start=start, end=end, **meter_options)
        return
    first = parse_when(start, "--from").date() if start else None
    last = parse_when(end, "--to").date() if end else None

    async def main() -> list[Any]:
        return await with_pool(
            settings,
            lambda pool: ReadStore(pool).usage(org_id, period, first, last, event_type),
        )

    rows = run_sync(main())
    if not rows:
        click.echo(f"no {period} usage for {org_id}")
        return
    print_table(
        ["period_start", "event_type", "value", "events", "updated_at"],
        [
            [
                str(r["period_start"]),
                r["event_type"],
                fmt(r["value"]),
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
    from metering.storage.reads import ReadStore

    settings = settings_of(ctx)
    org_id = parse_org(org)
    try:
        requested = Decimal(quantity)
    except ArithmeticError:
        raise click.BadParameter(f"{quantity!r} is not a number", param_hint="--quantity") from None

    async def main() -> dict[str, Any] | None:
        # the API's path: the reader role scoped to the org, one round trip
        return await with_pool(
            settings, lambda pool: ReadStore(pool).check(org_id, feature, requested)
        )

    result = run_sync(main())
    if result is None:
        click.echo(f"Error: unknown feature key {feature!r}", err=True)
        sys.exit(2)
    print_table(
        ["key", "value"],
        [[k, json.dumps(v) if isinstance(v, dict) else fmt(v)] for k, v in result.items()],
    )
    sys.exit(0 if result.get("allowed") else 1)


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

    settings = settings_of(ctx)
    now = datetime.now(UTC)
    try:
        horizon = keep_from(keep, now)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--keep") from None

    async def main() -> list[Any]:
        return await with_pool(
            settings,
            lambda pool: apply_retention(
                pool, horizon, dry_run, now=now, lateness_window=settings.lateness_window
            ),
        )

    try:
        dropped = run_sync(main())
    except RetentionTooShort as error:
        raise click.BadParameter(error.reason, param_hint="--keep") from None
    verb = "would drop" if dry_run else "dropped"
    for row in dropped:
        click.echo(
            f"{verb} {row['partition_name']} ({row['range_start']:%Y-%m-%d} .. "
            f"{row['range_end']:%Y-%m-%d}, {row['events']} events)"
        )
    click.echo(f"{verb} {len(dropped)} partitions; raw events kept from {horizon:%Y-%m-%d}")
