"""`metering meters create|list|show|archive`: meters defined at run time (contract §2)."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from typing import Any
from uuid import UUID

import click

from metering.cli.common import cli, fmt, print_table, run_sync, settings_of, with_pool
from metering.config import Settings


@cli.group()
def meters() -> None:
    """Define, list, show and archive meters: which events become which number.

    A meter reads the events of one type: `sum`, `count`, `max`, `latest`, `unique_count`
    of a value (`quantity`, `user_id` or `metadata.<path>`), optionally only events whose
    metadata matches a filter, per up to three dimensions (`--group-by`). A new meter
    counts every stored event of its type first (backfill), then turns `active`.
    """


@meters.command()
@click.argument("key")
@click.option("--event-type", required=True, help="The event `type` the meter reads.")
@click.option(
    "--aggregation",
    required=True,
    type=click.Choice(["sum", "count", "max", "latest", "unique_count", "time_weighted"]),
)
@click.option("--value", default=None, help="quantity (default), user_id or metadata.<path>.")
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="PATH=VALUE[,VALUE]",
    help="Count only events whose metadata PATH holds one of the values (repeatable; values "
    "are JSON when they parse as JSON, else text).",
)
@click.option("--group-by", multiple=True, metavar="PATH", help="A dimension (up to three).")
@click.option("--limit-key", default=None, help="The plan feature this meter counts against.")
@click.option("--limit-scope", type=click.Choice(["period", "lifetime"]), default=None)
@click.option("--limit-unit", default=None, help="Divide by this before comparing (e.g. 10^9).")
@click.option("--description", default="")
@click.option("--wait", is_flag=True, help="Show the backfill's progress until it is active.")
@click.pass_context
def create(ctx: click.Context, /, key: str, **options: Any) -> None:
    """Define the meter KEY. Exits 1 for a bad or conflicting definition (the reason is
    printed), 3 when PostgreSQL cannot be reached."""
    from metering.meters.definition import InvalidMeter, MeterSpec
    from metering.meters.store import MeterConflict, MeterStore

    settings = settings_of(ctx)
    raw: dict[str, Any] = {
        "key": key,
        "event_type": options["event_type"],
        "aggregation": options["aggregation"],
        "group_by": list(options["group_by"]),
        "description": options["description"],
    }
    for name in ("value", "limit_key", "limit_scope", "limit_unit"):
        if options[name] is not None:
            raw[name] = options[name]
    if options["filters"]:
        raw["filter"] = dict(_filter(item) for item in options["filters"])
    try:
        spec = MeterSpec.parse(raw)
    except InvalidMeter as error:
        raise click.ClickException(f"invalid meter: {error}") from None

    async def main() -> Any:
        return await with_pool(settings, lambda pool: MeterStore(pool).create(spec, "cli"))

    try:
        meter = run_sync(main())
    except MeterConflict as error:
        raise click.ClickException(error.reason) from None
    click.echo(f"created meter {meter.key} ({meter.status})")
    if options["wait"]:
        _wait_until_active(ctx, key)


def _filter(item: str) -> tuple[str, Any]:
    path, sep, values = item.partition("=")
    if not sep:
        raise click.BadParameter(f"{item!r}: expected PATH=VALUE[,VALUE]", param_hint="--filter")
    parsed = [_json_or_text(v) for v in values.split(",")]
    return path, parsed if len(parsed) > 1 else parsed[0]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _wait_until_active(ctx: click.Context, key: str) -> None:
    from metering.meters.store import Meter, MeterStore

    settings = settings_of(ctx)

    async def follow() -> Meter:
        async def watch(pool: Any) -> Meter:
            store = MeterStore(pool)
            with click.progressbar(length=1000, label=f"backfilling {key}") as bar:
                shown = 0
                while True:
                    meter = await store.get(key)
                    done = int(1000 * (meter.backfill_fraction() or 0.0))
                    bar.update(done - shown)
                    shown = done
                    if meter.status != "backfilling":
                        return meter
                    await asyncio.sleep(0.5)

        return await with_pool(settings, watch)

    meter = run_sync(follow())
    click.echo(f"{key}: {meter.status}, {meter.row['backfill_read']} stored events backfilled")


@meters.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def list_meters(ctx: click.Context, as_json: bool) -> None:
    """Every meter, archived ones included."""
    from metering.meters.store import MeterStore

    settings = settings_of(ctx)
    found = run_sync(with_pool(settings, lambda pool: MeterStore(pool).list()))
    if as_json:
        click.echo(json.dumps([m.document() for m in found], indent=2))
        return
    print_table(
        ["key", "event type", "aggregation", "value", "group by", "limit", "status"],
        [
            [
                m.key,
                m.row["event_type"],
                m.row["aggregation"],
                m.row["value"],
                ",".join(m.row["group_by"]) or "-",
                fmt(m.row["limit_key"]),
                m.status,
            ]
            for m in found
        ],
    )


@meters.command()
@click.argument("key")
@click.pass_context
def show(ctx: click.Context, key: str) -> None:
    """One meter as JSON, with its backfill's progress. Exits 2 for an unknown key."""
    from metering.meters.store import MeterNotFound, MeterStore

    settings = settings_of(ctx)
    try:
        meter = run_sync(with_pool(settings, lambda pool: MeterStore(pool).get(key)))
    except MeterNotFound as error:
        click.echo(f"Error: {error} (metering meters list shows them)", err=True)
        sys.exit(2)
    click.echo(json.dumps(meter.document(), indent=2))


@meters.command()
@click.argument("key")
@click.pass_context
def archive(ctx: click.Context, key: str) -> None:
    """Stop counting meter KEY; its numbers stay and its key is never reused."""
    from metering.meters.store import MeterConflict, MeterNotFound, MeterStore

    settings = settings_of(ctx)
    try:
        meter = run_sync(with_pool(settings, lambda pool: MeterStore(pool).archive(key)))
    except MeterNotFound as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)
    except MeterConflict as error:
        raise click.ClickException(error.reason) from None
    click.echo(f"{meter.key}: {meter.status}")


def print_meter_usage(
    settings: Settings,
    org_id: UUID,
    *,
    meter: str,
    window: str,
    start: str | None,
    end: str | None,
    group_by: str | None,
    tz: str | None,
    filters: tuple[str, ...],
    as_csv: bool,
) -> None:
    """`metering usage ORG --meter KEY`: the API's query, printed as a table or CSV. Exits
    2 for an unknown meter, 1 for a query that cannot be answered (the reason says why)."""
    from metering.meters.store import MeterNotFound
    from metering.meters.usage_store import MeterUsageStore
    from metering.meters.windows import InvalidUsageQuery
    from metering.models import utc_now

    wanted = {}
    for item in filters:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected DIMENSION=VALUE", param_hint="--filter")
        wanted[name] = value
    try:
        answer = run_sync(
            with_pool(
                settings,
                lambda pool: MeterUsageStore(pool).usage(
                    org_id,
                    meter,
                    window=window,
                    tz=tz,
                    start=start,
                    end=end,
                    group_by=None if group_by is None else [g for g in group_by.split(",") if g],
                    filters=wanted,
                    now=utc_now(),
                ),
            )
        )
    except MeterNotFound as error:
        click.echo(f"Error: {error} (metering meters list shows them)", err=True)
        sys.exit(2)
    except InvalidUsageQuery as error:
        raise click.ClickException(str(error)) from None
    zone = answer.windows.zone
    rows = [
        [
            r.start.astimezone(zone).isoformat(),
            answer.window_end(r).astimezone(zone).isoformat(),
            r.dimensions,
            format(r.value.normalize(), "f"),
            str(r.event_count),
        ]
        for r in answer.rows
    ]
    headers = ["window_start", "window_end", "dimensions", "value", "event_count"]
    if as_csv:
        out = csv.writer(sys.stdout)
        out.writerow(headers)
        out.writerows(rows)
        return
    if answer.status == "backfilling":
        click.echo(f"note: {meter} is still backfilling; these numbers are not complete")
    if not rows:
        click.echo(f"no usage of {meter} for {org_id} in {answer.windows.zone.key}")
        return
    print_table(headers, rows)
