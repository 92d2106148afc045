"""The service processes: `consume`, `aggregate`, `serve`, and `run` (all of them at once)."""

from __future__ import annotations

import sys
from typing import Any

import click

from metering.cli.common import cli, run_sync, settings_of
from metering.errors import AggregatorNotActive


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

    settings = settings_of(ctx)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    run_sync(run_consumer(settings))


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

    settings = settings_of(ctx)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    try:
        result = run_sync(run_aggregator(settings, once=once))
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

    settings = settings_of(ctx)
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

    settings = settings_of(ctx)

    async def main() -> int:
        after = publish_samples(settings) if demo else None
        return await supervise(service_children(settings), after_start=after)

    sys.exit(run_sync(main()))
