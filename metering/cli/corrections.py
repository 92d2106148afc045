"""`metering events cancel` and `metering audit`: corrections and their trail (contract §10).
`metering dlq` and `metering import` are in metering/cli/dead_letters.py and imports.py."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

import click

from metering.cli.common import (
    cli,
    fmt,
    parse_org,
    parse_when,
    print_table,
    run_sync,
    settings_of,
    with_pool,
)


@cli.group()
def events() -> None:
    """Corrections of stored events (cancel)."""


@events.command("cancel")
@click.argument("org")
@click.argument("event_ids", nargs=-1)
@click.option("--reason", required=True, help="Why (kept on each event and in the audit trail).")
@click.option(
    "--ids-from",
    type=click.File("r"),
    default=None,
    help="Also cancel the ids in this file, one per line ('-': standard input).",
)
@click.option("--type", "event_type", default=None, help="By range: only events of this type.")
@click.option("--from", "start", default=None, help="By range: occurred at or after (ISO).")
@click.option("--to", "end", default=None, help="By range: occurred before (ISO).")
@click.option("--dry-run", is_flag=True, help="Show what would be cancelled; change nothing.")
@click.pass_context
def cancel(
    ctx: click.Context,
    org: str,
    event_ids: tuple[str, ...],
    reason: str,
    ids_from: Any,
    event_type: str | None,
    start: str | None,
    end: str | None,
    dry_run: bool,
) -> None:
    """Cancel stored events of organization ORG: by id (EVENT_IDS and/or --ids-from), or
    every event that occurred in [--from, --to) (of --type when given).

    A cancelled event stays stored and its id stays claimed (a re-send is never counted);
    the aggregator recounts every period it was in within about a second. Idempotent:
    cancelling again changes nothing. Events older than the lateness window are refused.
    Exit status 1 when an id was unknown or outside the window (the others are cancelled).

    \b
      metering events cancel 0b4e... evt-1 evt-2 --reason "sent twice"
      metering events cancel 0b4e... --type api_call --from 2026-12-01 --to 2026-12-02 \\
          --reason "load test" --dry-run
    """
    from metering.corrections.cancel import CancelStore
    from metering.errors import OutsideLatenessWindow
    from metering.storage.audit import AuditLog, cli_actor

    settings = settings_of(ctx)
    org_id = parse_org(org)
    ids = list(event_ids)
    if ids_from is not None:
        ids += [line.strip() for line in ids_from if line.strip()]
    by_range = start is not None or end is not None or event_type is not None
    if by_range and ids:
        raise click.UsageError("give event ids or a range (--from/--to), not both")
    if not by_range and not ids:
        raise click.UsageError("give event ids, --ids-from FILE, or a range --from/--to")
    if by_range and (start is None or end is None):
        raise click.UsageError("a range needs both --from and --to")
    if not reason.strip():
        raise click.BadParameter("give a reason", param_hint="--reason")

    async def run(pool: Any) -> int:
        store = CancelStore(pool, AuditLog(pool), settings.lateness_window)
        if by_range:
            assert start is not None and end is not None
            first, last = parse_when(start, "--from"), parse_when(end, "--to")
            if last <= first:
                raise click.BadParameter("--to must be after --from", param_hint="--to")
            earliest = await store.earliest_cancellable()
            if first < earliest:
                raise click.ClickException(
                    f"--from {first.isoformat()} is outside the lateness window: events "
                    f"before {earliest.isoformat(timespec='seconds')} can no longer be cancelled"
                )
            rows = await store.preview(org_id, event_type, first, last)
            if rows:
                print_table(
                    ["type", "day", "events", "quantity"],
                    [[r.event_type, str(r.day), str(r.events), fmt(r.quantity)] for r in rows],
                )
            total = sum(r.events for r in rows)
            if dry_run:
                click.echo(f"dry run: would cancel {total} events; nothing changed", err=True)
                return 0
            try:
                count = await store.cancel_matching(
                    org_id, event_type, first, last, actor=cli_actor(), reason=reason
                )
            except OutsideLatenessWindow as error:
                raise click.ClickException(str(error)) from None
            click.echo(f"cancelled {count} events", err=True)
            return 0
        if dry_run:
            found = await store.lookup(org_id, ids)
            _print_outcomes(found)
            click.echo("dry run: nothing changed", err=True)
            return int(any(o.status in ("unknown", "outside_window") for o in found))
        outcomes = await store.cancel_ids(org_id, ids, actor=cli_actor(), reason=reason)
        _print_outcomes(outcomes)
        order = ("cancelled", "already_cancelled", "unknown", "outside_window")
        counts = {s: sum(1 for o in outcomes if o.status == s) for s in order}
        click.echo(
            ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n), err=True
        )
        return int(any(o.status in ("unknown", "outside_window") for o in outcomes))

    sys.exit(run_sync(with_pool(settings, run)))


def _print_outcomes(outcomes: list[Any]) -> None:
    print_table(
        ["event_id", "status", "type", "occurred_at", "quantity", "cancelled_by"],
        [
            [
                o.event_id,
                o.status,
                fmt(o.event_type),
                o.occurred_at.isoformat() if o.occurred_at else "-",
                fmt(o.quantity),
                fmt(o.cancelled_by),
            ]
            for o in outcomes
        ],
    )


@cli.command()
@click.option("--since", default=None, help="Entries at or after (ISO date or time).")
@click.option("--action", default=None, help="Only this action: events.cancel, dlq.replay, import.")
@click.option("--org", default=None, help="Only this organization.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.pass_context
def audit(
    ctx: click.Context,
    since: str | None,
    action: str | None,
    org: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The audit trail of corrections, newest first: who cancelled, replayed or imported
    what, and when."""
    from metering.storage.audit import AuditLog

    settings = settings_of(ctx)
    when: datetime | None = parse_when(since, "--since") if since else None
    org_id = parse_org(org) if org else None

    async def run(pool: Any) -> None:
        entries = await AuditLog(pool).entries(
            since=when, action=action, org_id=org_id, limit=limit
        )
        if as_json:
            for e in entries:
                click.echo(json.dumps(e.document()))
            return
        if not entries:
            click.echo("no entries", err=True)
            return
        print_table(
            ["id", "at", "actor", "action", "org", "details"],
            [
                [
                    str(e.id),
                    e.at.isoformat(timespec="seconds"),
                    e.actor,
                    e.action,
                    fmt(e.org_id),
                    json.dumps(e.details)[:100],
                ]
                for e in entries
            ],
        )

    run_sync(with_pool(settings, run))
