"""The one place configuration is read from the environment.

Every process builds a `Settings` once at start-up and passes it (or the parts it needs)
inward; nothing else reads `os.environ`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse `35d`, `12h`, `90m` or `30s` into a timedelta; raise ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration like '35d', '12h', '90m' or '30s': {text!r}")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


class Settings(BaseSettings):
    """Service configuration, from `METERING_*` environment variables (contract section 7)."""

    model_config = SettingsConfigDict(env_prefix="METERING_", extra="ignore")

    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/metering")
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    events_topic: str = "usage.events"
    dlq_topic: str = "usage.events.dlq"
    limits_topic: str = "usage.limits"
    lateness_window: timedelta = timedelta(days=35)
    future_tolerance: timedelta = timedelta(minutes=5)
    http_port: int = 8080
    # HTTP limits of `metering serve` (metering/api/server.py): how long a request's headers
    # and body may take to arrive; a slow or idle client is answered 408 and closed.
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    http_body_timeout_seconds: float = Field(default=30.0, gt=0)
    metrics_port: int = 9101

    consumer_group: str = "metering-writer"
    # Upper bound of one write transaction; bigger batches amortise the round trip and
    # the transaction commit, smaller ones cut end-to-end latency.
    consumer_batch_size: int = Field(default=5000, ge=1, le=50_000)
    consumer_batch_timeout_ms: int = Field(default=100, ge=1)
    # Events one aggregation pass takes from the consumer's transactions (at least one
    # transaction): catching up after the aggregator was down is then a series of passes
    # that each commit and move the watermark. 1M events: ~1 s of pass for live events,
    # ~10 s for events spread over 60 days (bench.aggregate).
    aggregator_max_pass_events: int = Field(default=1_000_000, ge=1)
    # The meter passes (meters that are not builtin) run at most every second and are busy
    # at most this fraction of the time, so that meters costing more than the machine can
    # give fall behind (metering_meter_watermark_lag_seconds) instead of slowing the v1
    # passes, the access check and the consumer down. Raise it on a machine with cores to
    # spare.
    meter_pass_busy_fraction: float = Field(default=0.25, gt=0, le=1)
    # Back-off while Postgres or Kafka is unavailable: doubles from min to max.
    retry_min_seconds: float = 0.2
    retry_max_seconds: float = 5.0

    # Webhooks (contract section 9): how long a delivery may take before it is retried,
    # and whether private, loopback and link-local addresses (and http) are allowed (tests,
    # or a receiver inside the operator's own network).
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    webhook_allow_private: bool = False

    # Usage pages (contract section 11): the browser origins that may call the read API
    # with a portal token (CORS), comma-separated; none by default. And the Prometheus
    # endpoints the operator overview (`GET /`) reads, comma-separated URLs; default the
    # processes `metering run` starts next to the API (metrics port, +1, +2).
    portal_origins: str = ""
    overview_metrics_urls: str = ""

    events_partitions: int = Field(default=6, ge=1)
    dev_dir: Path = Path(".dev")
    dev_kafka_controller_port: int = 9093
    kafka_jars_dir: Path = Path.home() / ".cache" / "metering" / "kafka-4.1.1"

    @property
    def portal_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.portal_origins.split(",") if o.strip()]

    @property
    def overview_metrics_url_list(self) -> list[str]:
        listed = [u.strip() for u in self.overview_metrics_urls.split(",") if u.strip()]
        return listed or [f"http://127.0.0.1:{self.metrics_port + n}/metrics" for n in range(3)]

    @field_validator("lateness_window", "future_tolerance", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if isinstance(value, str) and _DURATION.match(value):
            return parse_duration(value)
        return value

    @cached_property
    def kafka_port(self) -> int:
        """Port of the first bootstrap server; `metering dev up` listens there."""
        first = self.kafka_bootstrap_servers.split(",")[0]
        return int(first.rsplit(":", 1)[1])

    @cached_property
    def database_port(self) -> int:
        return urlsplit(self.database_url.get_secret_value()).port or 5432

    @cached_property
    def database_name(self) -> str:
        return urlsplit(self.database_url.get_secret_value()).path.lstrip("/") or "postgres"

    def environment(self) -> dict[str, str]:
        """These settings as METERING_* variables, for starting another process with them."""
        values = {
            "DATABASE_URL": self.database_url.get_secret_value(),
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "EVENTS_TOPIC": self.events_topic,
            "DLQ_TOPIC": self.dlq_topic,
            "LIMITS_TOPIC": self.limits_topic,
            "CONSUMER_GROUP": self.consumer_group,
            "CONSUMER_BATCH_SIZE": str(self.consumer_batch_size),
            "RETRY_MAX_SECONDS": str(self.retry_max_seconds),
            "DEV_DIR": str(self.dev_dir),
            "HTTP_HEADER_TIMEOUT_SECONDS": str(self.http_header_timeout_seconds),
            "HTTP_BODY_TIMEOUT_SECONDS": str(self.http_body_timeout_seconds),
            "WEBHOOK_TIMEOUT_SECONDS": str(self.webhook_timeout_seconds),
            "WEBHOOK_ALLOW_PRIVATE": str(self.webhook_allow_private).lower(),
            "PORTAL_ORIGINS": self.portal_origins,
            "OVERVIEW_METRICS_URLS": self.overview_metrics_urls,
        }
        return {f"METERING_{name}": value for name, value in values.items()}

    def child_environment(self) -> dict[str, str]:
        """The environment for a child process that must run with these settings."""
        return child_environment(self.environment())

    def admin_database_url(self) -> str:
        """The same server, database `postgres`: used to create the service database."""
        parts = urlsplit(self.database_url.get_secret_value())
        return parts._replace(path="/postgres").geturl()


def child_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with `overrides`, for a child process (PATH, locale and
    the rest pass through)."""
    return {**os.environ, **overrides}


def load_settings() -> Settings:
    """Read the environment once. Raise pydantic.ValidationError naming the bad variable."""
    return Settings()
