"""Start, stop and inspect the local Kafka (KRaft, from Maven Central jars) and PostgreSQL
(Debian's package, in a cluster under the project's dev folder).

Everything lives under `settings.dev_dir` (default `.dev/`): data, logs and pid files.
`down` stops only processes whose pid files `up` wrote. Readiness is polled, not slept.
"""

from __future__ import annotations

from dataclasses import dataclass

from metering.config import Settings
from metering.devenv.kafka import KafkaService, _kafka_cluster_id
from metering.devenv.postgres import PostgresService

__all__ = ["DevServices", "ServiceStatus", "_kafka_cluster_id"]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    detail: str


class DevServices(KafkaService, PostgresService):
    """The local services of `settings` (ports come from the DSN and bootstrap servers)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.dev_dir.resolve()
        self.kafka_dir = self.root / "kafka"
        self.pg_dir = self.root / "postgres"

    def status(self) -> list[ServiceStatus]:
        kafka_pid = self.kafka_running()
        pg_pid = self.postgres_running()
        return [
            ServiceStatus(
                "kafka",
                kafka_pid is not None,
                kafka_pid,
                f"127.0.0.1:{self.settings.kafka_port}",
                str(self.kafka_log),
            ),
            ServiceStatus(
                "postgres",
                pg_pid is not None,
                pg_pid,
                f"127.0.0.1:{self.settings.database_port}",
                str(self.pg_log),
            ),
        ]
