"""`metering keys create|list|revoke`: API keys (printed once, stored as hashes)."""

from __future__ import annotations

from typing import Any

import click

from metering.cli.common import cli, parse_org, print_table, run_sync, settings_of, with_pool


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

    settings = settings_of(ctx)
    org = parse_org(org_id) if org_id else None

    async def main() -> str:
        key, _ = await with_pool(
            settings, lambda pool: KeyStore(pool).create(sorted(set(scopes)), org, name)
        )
        return key

    click.echo(run_sync(main()))


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List keys (prefix, scopes, organization, state); never the secret."""
    from metering.storage.keys import KeyStore

    settings = settings_of(ctx)

    async def main() -> list[Any]:
        return await with_pool(settings, lambda pool: KeyStore(pool).list())

    found = run_sync(main())
    if not found:
        click.echo("no keys; create one with `metering keys create --scope read`")
        return
    print_table(
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

    settings = settings_of(ctx)

    async def main() -> bool:
        return await with_pool(settings, lambda pool: KeyStore(pool).revoke(prefix))

    if not run_sync(main()):
        raise click.ClickException(f"no active key with prefix {prefix!r}")
    click.echo(f"revoked {prefix}")
