"""`metering`: the command line of contract section 6. Run `metering --help`.

Commands by concern: `dev` (local services, migrate), `services` (the processes of the
service), `data` (usage, checks, recomputation, retention), `meters`, `admin` (API keys); `common`
holds the root group and what they share.
"""

from metering.cli import admin, data, dev, meters, services  # noqa: F401  (each registers its commands)
from metering.cli.common import cli


def main() -> None:
    cli(prog_name="metering")


__all__ = ["cli", "main"]
