"""`metering limits set|unset ORG FEATURE`: an organization's own limits (contract §8)."""

from __future__ import annotations

from typing import Any

import click

from metering.cli.common import cli, parse_org, run_sync, settings_of, with_pool


@cli.group()
def limits() -> None:
    """An organization's own limits, over its plan's (enterprise contracts, soft limits,
    other thresholds). Audited; `metering audit --action limits.set` shows who changed what."""


def _thresholds(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        found = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give percentages separated by commas, e.g. 50,80,100",
            param_hint="--thresholds",
        ) from None
    if not 1 <= len(found) <= 10 or not all(1 <= t <= 1000 for t in found):
        raise click.BadParameter(
            "1 to 10 percentages, each from 1 to 1000", param_hint="--thresholds"
        )
    return found


@limits.command("set")
@click.argument("org")
@click.argument("feature")
@click.option(
    "--limit",
    "limit_value",
    type=click.IntRange(-1),
    required=True,
    help="The limit (-1: unlimited).",
)
@click.option("--soft", is_flag=True, help="Never refuse past it; report the overage.")
@click.option(
    "--thresholds",
    default=None,
    help="Percentages to notify, e.g. 50,80,100 (default: the plan's).",
)
@click.pass_context
def set_limit(
    ctx: click.Context,
    org: str,
    feature: str,
    limit_value: int,
    soft: bool,
    thresholds: str | None,
) -> None:
    """Give organization ORG its own limit for FEATURE (e.g. max_api_calls_per_month). It
    applies from the next access check; lowering it mid-period notifies the thresholds it
    now crosses, once."""
    from metering.limits.overrides import OverrideStore, UnknownLimit
    from metering.storage.audit import AuditLog, cli_actor

    org_id = parse_org(org)
    chosen = _thresholds(thresholds)

    async def run(pool: Any) -> None:
        try:
            old, new = await OverrideStore(pool, AuditLog(pool)).set(
                org_id,
                feature,
                limit=limit_value,
                soft=soft,
                thresholds=chosen,
                actor=cli_actor(),
            )
        except UnknownLimit as error:
            raise click.ClickException(str(error)) from None
        kind = "soft" if new.soft else "hard"
        shown = ",".join(map(str, new.thresholds)) if new.thresholds else "the plan's"
        was = f" (was {old.limit})" if old else " (was the plan's)"
        click.echo(f"{org_id} {feature}: {new.limit}{was}, {kind}, thresholds {shown}")

    run_sync(with_pool(settings_of(ctx), run))


@limits.command("unset")
@click.argument("org")
@click.argument("feature")
@click.pass_context
def unset_limit(ctx: click.Context, org: str, feature: str) -> None:
    """Remove organization ORG's own limit for FEATURE: its plan's applies again."""
    from metering.limits.overrides import OverrideStore
    from metering.storage.audit import AuditLog, cli_actor

    org_id = parse_org(org)

    async def run(pool: Any) -> None:
        store = OverrideStore(pool, AuditLog(pool))
        old = await store.unset(org_id, feature, actor=cli_actor())
        if old is None:
            raise click.ClickException(f"{org_id} has no limit of its own for {feature}")
        effective = await store.effective(org_id, feature)
        click.echo(
            f"{org_id} {feature}: back to the {effective.plan} plan's {effective.limit} "
            f"(was {old.limit})"
        )

    run_sync(with_pool(settings_of(ctx), run))
