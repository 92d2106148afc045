"""Shared fixtures. Tests marked `services` run against the real Kafka and PostgreSQL of
`metering dev up`; the `dev_services` fixture starts them when they are not running."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from pydantic import SecretStr

from metering.config import Settings
from metering.devenv.services import DevServices
from metering.storage.keys import KeyStore
from metering.topics import (
    TopicSpec,
    committed_reader,
    delete_topics,
    ensure_topics,
    topic_specs,
)

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE = "metering_test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def async_wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Defaults of the local environment, pointed at a test database."""
    defaults = Settings()
    dsn = defaults.database_url.get_secret_value().rsplit("/", 1)[0] + f"/{TEST_DATABASE}"
    return defaults.model_copy(update={"database_url": SecretStr(dsn), "dev_dir": ROOT / ".dev"})


@pytest.fixture(scope="session")
def dev_services(base_settings: Settings) -> DevServices:
    """The real Kafka and PostgreSQL, started if needed (left running for the next run)."""
    services = DevServices(base_settings)
    services.start_postgres()
    services.start_kafka()
    return services


@pytest.fixture(scope="session")
def session_topics(dev_services: DevServices, base_settings: Settings) -> Iterator[list[str]]:
    """Topics the tests of this session made; deleted when it ends, so that they do not pile
    up in the dev broker (another session running at the same time keeps its own)."""
    made: list[str] = []
    yield made
    asyncio.run(delete_topics(base_settings, made))


@pytest.fixture(scope="session")
def migrated_database(dev_services: DevServices, base_settings: Settings) -> str:
    """A freshly created, migrated test database; its DSN."""

    asyncio.run(dev_services.recreate_database())
    return base_settings.database_url.get_secret_value()


@pytest.fixture
def settings(
    base_settings: Settings, migrated_database: str, session_topics: list[str]
) -> Settings:
    """Settings with topics and a consumer group of this test's own, so offsets and
    messages of one test never reach another. The topics exist when the test starts."""
    suffix = uuid.uuid4().hex[:8]
    isolated = base_settings.model_copy(
        update={
            "events_topic": f"test.events.{suffix}",
            "dlq_topic": f"test.events.dlq.{suffix}",
            "limits_topic": f"test.limits.{suffix}",
            "consumer_group": f"test-writer-{suffix}",
            "metrics_port": free_port(),
            "retry_max_seconds": 1.0,
        }
    )
    # the service's own topic settings, with fewer partitions where tests read them back
    specs = [
        TopicSpec(spec.name, partitions, spec.config)
        for spec, partitions in zip(topic_specs(isolated), (6, 1, 1), strict=True)
    ]
    asyncio.run(ensure_topics(isolated, specs))
    session_topics += [isolated.events_topic, isolated.dlq_topic, isolated.limits_topic]
    return isolated


@pytest.fixture
async def db(migrated_database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(migrated_database)
    try:
        yield conn
    finally:
        await conn.close()


class ConsumerProcess:
    """`metering consume` in a subprocess, so tests can SIGKILL it like a crash would."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.metrics_port = free_port()
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "metering", "consume", "--metrics-port", str(self.metrics_port)],
            env=settings.child_environment(),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_consumer(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., ConsumerProcess]]:
    started: list[ConsumerProcess] = []

    def start(custom: Settings | None = None) -> ConsumerProcess:
        process = ConsumerProcess(custom or settings, tmp_path / f"consumer-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    kafka = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
    )
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.stop()


async def read_topic(
    settings: Settings, topic: str, expected: int, timeout: float = 30
) -> list[Any]:
    """Read `expected` records from the start of `topic` (fails if fewer arrive)."""
    consumer = committed_reader(settings, topic)
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


async def read_to_end(settings: Settings, topic: str, timeout: float = 30) -> list[Any]:
    """Every committed record of `topic`, from its start to its end as of now."""
    consumer = committed_reader(settings, topic)
    await consumer.start()
    records: list[Any] = []
    try:
        partitions = [
            TopicPartition(topic, n) for n in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        assert partitions, f"{topic} has no partitions"
        consumer.unsubscribe()
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout
        pending = set(partitions)
        while pending:
            assert time.monotonic() < deadline, f"{topic} not read to its end in {timeout}s"
            for partition_records in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(partition_records)
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return records


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def serving(settings: Settings, log: Path) -> Iterator[Server]:
    """`metering serve` with `settings` on a free port, until the block ends."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "metering", "serve", "--port", str(port)],
        env=settings.child_environment(),
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{log.read_text()}") from None
            time.sleep(0.1)
    try:
        yield Server(url, process, log)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def server(settings: Settings, tmp_path: Path) -> Iterator[Server]:
    with serving(settings, tmp_path / "serve.log") as running:
        yield running


def usage_event_text(org: uuid.UUID, event_id: str, occurred_at: datetime | None = None) -> str:
    """A valid api_call event of `org`, as JSON text (occurred now unless given)."""
    return json.dumps(
        {
            "id": event_id,
            "type": "api_call",
            "org_id": str(org),
            "occurred_at": (occurred_at or datetime.now(UTC)).isoformat(),
        }
    )


def with_field(raw: str, fragment: str) -> str:
    """The JSON object text `raw` with a field given as text (`"quantity":1e5`) added first:
    for values json.dumps cannot write (huge exponents, NaN)."""
    return "{" + fragment + "," + raw[1:]


@pytest.fixture
async def make_key(migrated_database: str):  # type: ignore[no-untyped-def]
    pool = await asyncpg.create_pool(migrated_database, min_size=1, max_size=2)
    store = KeyStore(pool)

    async def make(*scopes: str, org: object = None) -> str:
        key, _ = await store.create(list(scopes), org)  # type: ignore[arg-type]
        return key

    make.store = store  # type: ignore[attr-defined]
    yield make
    await pool.close()


@pytest.fixture
def start_aggregator(settings: Settings) -> Iterator[Callable[[], int]]:
    """Start `metering aggregate` in a subprocess; returns its metrics port. Stopped after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        port = free_port()
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "metering", "aggregate", "--metrics-port", str(port)],
                env=settings.child_environment(),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        return port

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=30)
