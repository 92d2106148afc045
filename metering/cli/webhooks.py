"""`metering webhooks add|list|remove|deliveries|redeliver|deliver` (contract §9)."""

from __future__ import annotations

import uuid
from typing import Any

import click

from metering.cli.common import cli, fmt, parse_org, print_table, run_sync, settings_of, with_pool


@cli.group()
def webhooks() -> None:
    """Signed HTTP callbacks for limit crossings (limit.crossed) and finished backfills
    (meter.backfilled), delivered at least once with retries for 24 hours.

    `deliver` is the process that sends them (`metering run` runs one too).
    """


def _endpoint_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an endpoint id", param_hint="ID") from None


@webhooks.command("add")
@click.argument("url")
@click.option("--org", default=None, help="Only this organization's messages.")
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(["limit.crossed", "meter.backfilled"]),
    help="Message types (repeat; default: all).",
)
@click.option("--description", default="", help="What it is for.")
@click.pass_context
def add(
    ctx: click.Context, url: str, org: str | None, types: tuple[str, ...], description: str
) -> None:
    """Add an endpoint; prints its signing secret once (verify `webhook-signature` with it,
    per Standard Webhooks). Only public https URLs unless METERING_WEBHOOK_ALLOW_PRIVATE."""
    from metering.storage.audit import cli_actor
    from metering.webhooks.addresses import UnsafeWebhookUrl, check_url
    from metering.webhooks.signing import new_secret
    from metering.webhooks.store import WEBHOOK_TYPES, TooManyEndpoints, WebhookStore

    settings = settings_of(ctx)
    try:
        check_url(url, allow_private=settings.webhook_allow_private)
    except UnsafeWebhookUrl as error:
        raise click.BadParameter(error.reason, param_hint="URL") from None
    org_id = parse_org(org) if org else None

    async def run(pool: Any) -> None:
        try:
            endpoint = await WebhookStore(pool).add_endpoint(
                url,
                org_id,
                list(types or WEBHOOK_TYPES),
                description,
                new_secret(),
                cli_actor(),
            )
        except TooManyEndpoints as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"added endpoint {endpoint.id} -> {endpoint.url}")
        click.echo(f"signing secret (shown once): {endpoint.secret}")

    run_sync(with_pool(settings, run))


@webhooks.command("list")
@click.pass_context
def list_endpoints(ctx: click.Context) -> None:
    """The endpoints, with what they receive."""
    from metering.webhooks.store import WebhookStore

    async def run(pool: Any) -> None:
        endpoints = await WebhookStore(pool).endpoints()
        if not endpoints:
            click.echo("no endpoints", err=True)
            return
        print_table(
            ["id", "url", "org", "types", "description"],
            [
                [str(e.id), e.url, fmt(e.org_id), ",".join(e.types), e.description]
                for e in endpoints
            ],
        )

    run_sync(with_pool(settings_of(ctx), run))


@webhooks.command("remove")
@click.argument("endpoint")
@click.pass_context
def remove(ctx: click.Context, endpoint: str) -> None:
    """Remove an endpoint (nothing more is sent to it; its log stays)."""
    from metering.webhooks.store import WebhookStore

    endpoint_id = _endpoint_id(endpoint)

    async def run(pool: Any) -> None:
        if not await WebhookStore(pool).remove_endpoint(endpoint_id):
            raise click.ClickException(f"no endpoint {endpoint_id}")
        click.echo(f"removed {endpoint_id}")

    run_sync(with_pool(settings_of(ctx), run))


@webhooks.command("deliveries")
@click.argument("endpoint")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed"]), default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.pass_context
def deliveries(ctx: click.Context, endpoint: str, status: str | None, limit: int) -> None:
    """An endpoint's deliveries, newest first, with each attempt (status, latency, error)."""
    from metering.webhooks.store import WebhookStore

    endpoint_id = _endpoint_id(endpoint)

    async def run(pool: Any) -> None:
        found = await WebhookStore(pool).deliveries(endpoint_id, status=status, limit=limit)
        if not found:
            click.echo("no deliveries", err=True)
            return
        rows = []
        for delivery, attempts in found:
            last = attempts[-1] if attempts else None
            rows.append(
                [
                    str(delivery.id),
                    delivery.message_id,
                    delivery.type,
                    delivery.status,
                    str(delivery.attempts),
                    fmt(last.status_code) if last else "-",
                    f"{last.latency_ms:.0f} ms" if last else "-",
                    fmt(delivery.last_error),
                ]
            )
        print_table(
            ["delivery", "webhook-id", "type", "status", "attempts", "last", "latency", "error"],
            rows,
        )

    run_sync(with_pool(settings_of(ctx), run))


@webhooks.command("redeliver")
@click.argument("endpoint")
@click.argument("delivery", type=int)
@click.pass_context
def redeliver(ctx: click.Context, endpoint: str, delivery: int) -> None:
    """Send a delivered or failed message again, now (same webhook-id, 24 fresh hours)."""
    from metering.models import utc_now
    from metering.webhooks.store import WebhookStore

    endpoint_id = _endpoint_id(endpoint)

    async def run(pool: Any) -> None:
        found = await WebhookStore(pool).redeliver(endpoint_id, delivery, utc_now())
        if found is None:
            raise click.ClickException(f"no delivery {delivery} of endpoint {endpoint_id}")
        click.echo(f"delivery {delivery} ({found.message_id}) is due again")

    run_sync(with_pool(settings_of(ctx), run))


@webhooks.command("deliver")
@click.option("--once", is_flag=True, help="Send what is due now, then exit.")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (default: config).")
@click.pass_context
def deliver(ctx: click.Context, once: bool, metrics_port: int | None) -> None:
    """The delivery process: sends due webhooks, retries failures with back-off. Run one
    or more (they never send the same delivery twice at once); `metering run` runs one."""
    from metering.webhooks.process import run_deliverer

    settings = settings_of(ctx)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    run_sync(run_deliverer(settings, once=once))
