"""`metering dlq list|show|replay`: the dead-letter topic, read and replayed (contract §10)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import datetime
from typing import Any

import click

from metering.cli.common import (
    DependencyDown,
    cli,
    parse_when,
    print_table,
    run_sync,
    settings_of,
    with_pool,
)
from metering.config import Settings


@cli.group()
def dlq() -> None:
    """The dead-letter topic: every message the consumer refused, unchanged, with why.

    `list` shows them, `show` one with its original bytes and headers, `replay` publishes
    them again to the events topic (after the cause is fixed, e.g. the missing meter was
    created); the dedupe key makes a replay safe to run twice.
    """


def _since(value: str | None) -> datetime | None:
    return parse_when(value, "--since") if value else None


def _kafka_down(settings: Settings, error: Exception) -> DependencyDown:
    return DependencyDown.unreachable(
        f"cannot read {settings.dlq_topic} from Kafka: {error or type(error).__name__}",
        "METERING_KAFKA_BOOTSTRAP_SERVERS",
    )


@dlq.command("list")
@click.option("--code", default=None, help="Only this error code (e.g. unknown_type).")
@click.option("--since", default=None, help="Only dead letters written at or after (ISO).")
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Rows shown (the counts per code cover every one).",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.pass_context
def list_dead_letters(
    ctx: click.Context, code: str | None, since: str | None, limit: int, as_json: bool
) -> None:
    """Dead letters as a table: position (partition:offset), when, code, reason and the
    organization when readable; then how many there are per code."""
    from aiokafka.errors import KafkaError

    from metering.corrections.dead_letters import dead_letters

    settings = settings_of(ctx)
    when = _since(since)

    async def run() -> tuple[list[list[str]], Counter[str]]:
        rows: list[list[str]] = []
        codes: Counter[str] = Counter()
        async for record in dead_letters(settings, since=when, code=code):
            codes[record.code] += 1
            if len(rows) >= limit:
                continue
            if as_json:
                click.echo(
                    json.dumps(
                        {
                            "position": record.position,
                            "at": record.timestamp.isoformat(),
                            "code": record.code,
                            "reason": record.reason,
                            "org_id": record.org_id(),
                        }
                    )
                )
            rows.append(
                [
                    record.position,
                    record.timestamp.isoformat(timespec="seconds"),
                    record.code,
                    record.reason[:70],
                    record.org_id() or "-",
                ]
            )
        return rows, codes

    try:
        rows, codes = run_sync(run())
    except (KafkaError, LookupError, OSError) as error:
        raise _kafka_down(settings, error) from None
    if as_json:
        return
    if not rows:
        click.echo("no dead letters", err=True)
        return
    print_table(["position", "at", "code", "reason", "org"], rows)
    shown = f" (showing {len(rows)})" if sum(codes.values()) > len(rows) else ""
    summary = ", ".join(f"{c}: {n}" for c, n in codes.most_common())
    click.echo(f"{sum(codes.values())} dead letters{shown}; by code: {summary}", err=True)


@dlq.command("show")
@click.argument("position")
@click.option("--raw", is_flag=True, help="Write only the original bytes to standard output.")
@click.pass_context
def show_dead_letter(ctx: click.Context, position: str, raw: bool) -> None:
    """One dead letter at POSITION (partition:offset, as `dlq list` prints it): its
    headers, key and original bytes."""
    from aiokafka.errors import KafkaError

    from metering.corrections.dead_letters import find_dead_letter

    settings = settings_of(ctx)
    try:
        partition_text, offset_text = position.split(":")
        partition, offset = int(partition_text), int(offset_text)
    except ValueError:
        raise click.BadParameter(
            f"{position!r} is not partition:offset (e.g. 0:42)", param_hint="POSITION"
        ) from None
    try:
        record = run_sync(find_dead_letter(settings, partition, offset))
    except LookupError as error:
        raise click.ClickException(str(error)) from None
    except (KafkaError, OSError) as error:
        raise _kafka_down(settings, error) from None
    if raw:
        sys.stdout.buffer.write(record.value or b"")
        return
    click.echo(f"position   {record.position} of {settings.dlq_topic}")
    click.echo(f"written    {record.timestamp.isoformat()}")
    for name, value in record.headers:
        click.echo(f"{name:<10} {value.decode('utf-8', 'replace')}")
    click.echo(f"key        {record.key!r}")
    click.echo(f"value      ({len(record.value or b'')} bytes)")
    try:
        click.echo((record.value or b"").decode("utf-8"))
    except UnicodeDecodeError:
        click.echo(repr(record.value))


@dlq.command("replay")
@click.option("--code", default=None, help="Only dead letters of this error code.")
@click.option("--since", default=None, help="Only dead letters written at or after (ISO).")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; publish nothing.")
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the consumer to process the replayed messages.",
)
@click.pass_context
def replay(
    ctx: click.Context,
    code: str | None,
    since: str | None,
    dry_run: bool,
    wait_seconds: float,
) -> None:
    """Publish dead letters again to the events topic, original bytes and key, and report
    how many went back (stored now, or stored already) and how many were dead-lettered
    again (by code). Safe to run twice: an event is never stored twice.

    Exit status 1 when some failed again or were not processed within --wait (is
    `metering consume` running?). Recorded in the audit trail (`metering audit`).
    """
    from aiokafka.errors import KafkaError
    from tqdm import tqdm

    from metering.corrections.claims import Claims
    from metering.corrections.dead_letters import (
        ReplayReport,
        dead_letter_ends,
        dead_letters,
        failed_again,
        republish,
        wait_until_processed,
    )
    from metering.storage.audit import AuditLog, cli_actor

    settings = settings_of(ctx)
    when = _since(since)

    async def run(pool: Any) -> ReplayReport:
        report = ReplayReport()
        ends = await dead_letter_ends(settings)
        selected = dead_letters(settings, since=when, code=code, ends=ends)
        if dry_run:
            async for record in selected:
                report.published += 1
                report.by_code[record.code] += 1
            return report
        claims = Claims(pool)
        started = await claims.now()
        with tqdm(unit="msg", desc="replaying", file=sys.stderr) as bar:

            def sent(record: Any) -> None:
                report.by_code[record.code] += 1
                bar.update()

            published = await republish(settings, selected, on_sent=sent)
        report.published = len(published)
        if not published:
            return report
        click.echo(
            f"published {len(published)}; waiting for the consumer (up to {wait_seconds:g}s)",
            err=True,
        )
        processed = await wait_until_processed(settings, published, wait_seconds)
        report.processed = len(processed)
        report.failed_again = await failed_again(settings, ends, processed)
        events = [
            p.event
            for p in published
            if p.event is not None and (p.partition, p.offset) in processed
        ]
        report.stored = await claims.stored_since(events, started)
        await AuditLog(pool).record(
            cli_actor(),
            "dlq.replay",
            {"code": code, "since": since, **report.document()},
        )
        return report

    try:
        report = run_sync(with_pool(settings, run))
    except (KafkaError, LookupError, OSError) as error:
        raise _kafka_down(settings, error) from None
    if dry_run:
        summary = ", ".join(f"{c}: {n}" for c, n in report.by_code.most_common()) or "none"
        click.echo(f"dry run: would replay {report.published} ({summary}); nothing published")
        return
    again = ", ".join(f"{c}: {n}" for c, n in report.failed_again.most_common())
    click.echo(
        f"replayed {report.published}: {report.stored} stored now, "
        f"{report.already_stored} stored already, "
        f"{sum(report.failed_again.values())} dead-lettered again"
        + (f" ({again})" if again else "")
        + (f", {report.pending} not processed yet" if report.pending else "")
    )
    if report.failed_again or report.pending:
        sys.exit(1)
