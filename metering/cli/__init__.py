"""`metering`: the command line of contract section 6. Run `metering --help`.

Commands by concern: `dev` (local services, migrate), `services` (the processes of the
service), `data` (usage, checks, recomputation, retention), `meters`, `corrections` (cancel,
audit), `dead_letters` (dlq), `imports`, `limits`, `webhooks`, `portal` (usage page links),
`admin` (API keys);
`common` holds the root group and what they share.
"""

from metering.cli import (  # noqa: F401  (each registers its commands)
    admin,
    corrections,
    data,
    dead_letters,
    dev,
    imports,
    limits,
    meters,
    portal,
    services,
    webhooks,
)
from metering.cli.common import cli


def main() -> None:
    cli(prog_name="metering")


__all__ = ["cli", "main"]
