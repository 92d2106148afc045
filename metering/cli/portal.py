"""`metering portal-token ORG`: a link to an organization's usage page (contract §11)."""

from __future__ import annotations

from typing import Any

import click

from metering.cli.common import cli, parse_org, run_sync, settings_of, with_pool


@cli.command("portal-token")
@click.argument("org")
@click.option(
    "--meter",
    "meters",
    multiple=True,
    help="Only this meter (repeat for several; default: every meter).",
)
@click.option(
    "--expires-in",
    default="1h",
    show_default=True,
    help="How long the token reads: 1m to 24h (e.g. 30m, 8h).",
)
@click.option(
    "--url",
    "base_url",
    default=None,
    help="The API's address for the printed link (default http://127.0.0.1:$METERING_HTTP_PORT).",
)
@click.pass_context
def portal_token(
    ctx: click.Context, org: str, meters: tuple[str, ...], expires_in: str, base_url: str | None
) -> None:
    """Print a portal token for organization ORG and the link to its usage page. The token
    reads only ORG (and only the --meter meters when given) until it expires; every other
    route refuses it. Audited as portal_token.created."""
    from metering.config import parse_duration
    from metering.portal.tokens import InvalidPortalToken, PortalTokenStore, lifetime_of
    from metering.storage.audit import AuditLog, cli_actor

    org_id = parse_org(org)
    settings = settings_of(ctx)
    try:
        lifetime = lifetime_of(int(parse_duration(expires_in).total_seconds()))
    except (ValueError, InvalidPortalToken) as error:
        raise click.BadParameter(str(error), param_hint="--expires-in") from None
    base = (base_url or f"http://127.0.0.1:{settings.http_port}").rstrip("/")

    async def run(pool: Any) -> None:
        try:
            issued = await PortalTokenStore(pool, AuditLog(pool)).issue(
                org_id, list(meters) or None, lifetime, created_by=cli_actor()
            )
        except InvalidPortalToken as error:
            raise click.BadParameter(error.reason, param_hint="--meter") from None
        credential = issued.credential
        assert credential.expires_at is not None
        click.echo(issued.token)
        click.echo(f"page: {base}/orgs/{org_id}?token={issued.token}", err=True)
        click.echo(f"expires at {credential.expires_at.isoformat()}", err=True)

    run_sync(with_pool(settings_of(ctx), run))
