"""`metering import FILE`: usage events from a JSON-lines or CSV file (contract §10)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from metering.cli.common import DependencyDown, cli, run_sync, settings_of, with_pool

BATCH_EVENTS = 5_000


@cli.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "kind",
    type=click.Choice(["auto", "jsonl", "csv"]),
    default="auto",
    show_default=True,
    help="auto: by the name (.csv, .jsonl), else the content.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=BATCH_EVENTS,
    show_default=True,
    help="Events published (and acknowledged) per batch.",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Start from the first row even if an earlier run was interrupted.",
)
@click.pass_context
def import_file(ctx: click.Context, file: Path, kind: str, batch_size: int, restart: bool) -> None:
    """Publish the usage events of FILE: JSON lines of contract section 1 events, or CSV
    with a header naming the columns id, type, org_id, occurred_at and optionally user_id,
    quantity, metadata (a JSON object).

    Each row is validated as the consumer would (type read by an active meter, lateness,
    exact quantity...) before it is sent; bad rows go to FILE.rejected (JSON lines: line,
    code, reason, row) and the good ones are published in batches with a progress bar.
    Interrupted, it resumes after the last batch Kafka acknowledged (FILE.import-state);
    run twice, it stores nothing twice (the event ids are the dedupe keys).

    Exit status 0: every row published; 1: some rows rejected (the others published).
    """
    from aiokafka.errors import KafkaError
    from tqdm import tqdm

    from metering.corrections.importer import (
        FileImport,
        ImportFileError,
        ImportState,
        Row,
        detect_format,
        fingerprint,
        open_text,
        validate,
    )
    from metering.kafka_batches import EventPublisher, events_producer
    from metering.meters.registry import load_accepted_types
    from metering.models import utc_now
    from metering.partitioner import OrgKeyPartitioner
    from metering.storage.audit import AuditLog, cli_actor

    settings = settings_of(ctx)
    with file.open("rb") as head:
        found = detect_format(file, head.read(4096)) if kind == "auto" else kind
    mark = fingerprint(file)
    state_path = file.with_name(file.name + ".import-state")
    state = None if restart else ImportState.load(state_path)
    if state is not None and (state.fingerprint, state.format) != (mark, found):
        click.echo(f"{state_path} is from another file or format: starting over", err=True)
        state = None
    resumed = state is not None
    if state is not None:
        click.echo(
            f"resuming after row {state.rows_done} ({state.published} events published, "
            f"{state.rejected} rejected so far; --restart to start over)",
            err=True,
        )
    with open_text(file) as text:
        lines = sum(1 for _ in text)

    async def run(pool: Any) -> FileImport:
        known = await load_accepted_types(pool)
        partitioner = OrgKeyPartitioner()
        producer = events_producer(settings, partitioner, linger_ms=5)
        try:
            await producer.start()
        except KafkaError as error:
            await producer.stop()
            raise DependencyDown.unreachable(
                f"cannot reach Kafka: {error}", "METERING_KAFKA_BOOTSTRAP_SERVERS"
            ) from None
        publisher = EventPublisher(producer, partitioner, settings.events_topic)

        def judge(row: Row) -> Any:
            return validate(
                row,
                now=utc_now(),
                lateness_window=settings.lateness_window,
                future_tolerance=settings.future_tolerance,
                known_types=known,
            )

        with tqdm(total=lines, unit="row", desc="importing", file=sys.stderr) as bar:
            job = FileImport(
                file,
                state or ImportState(mark, found),  # type: ignore[arg-type]
                resumed=resumed,
                judge=judge,
                publish=publisher.publish,
                batch_size=batch_size,
                on_progress=lambda line: _advance(bar, line),
            )
            try:
                await job.run()
            finally:
                await publisher.close()
                await producer.stop()
            bar.update(lines - bar.n)
        done = job.state
        where = await asyncio.to_thread(file.resolve)
        await AuditLog(pool).record(
            cli_actor(),
            "import",
            {
                "file": str(where),
                "format": done.format,
                "rows": done.rows_done,
                "published": done.published,
                "rejected": done.rejected,
                "resumed": resumed,
            },
        )
        return job

    try:
        job = run_sync(with_pool(settings, run))
    except ImportFileError as error:
        raise click.ClickException(error.reason) from None
    except KafkaError as error:
        raise DependencyDown.unreachable(
            f"lost Kafka ({error}); run the same command again to resume",
            "METERING_KAFKA_BOOTSTRAP_SERVERS",
        ) from None
    done = job.state
    job.state_path.unlink(missing_ok=True)
    if done.rejected == 0:
        job.rejected_path.unlink(missing_ok=True)
    click.echo(
        f"{file}: {done.published} events published, {done.rejected} rows rejected"
        + (f" (see {job.rejected_path})" if done.rejected else ""),
        err=True,
    )
    if done.rejected:
        sys.exit(1)


def _advance(bar: Any, line: int) -> None:
    """Move the progress bar (in lines of the file) to `line`."""
    bar.update(line - bar.n)
