"""Start, stop and inspect the local Kafka (KRaft, from Maven Central jars) and PostgreSQL
(Debian's package, in a cluster under the project's dev folder).

Everything lives under `settings.dev_dir` (default `.dev/`): data, logs and pid files.
`down` stops only processes whose pid files `up` wrote. Readiness is polled, not slept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg
import psutil

from metering.config import Settings, child_environment
from metering.errors import DevEnvironmentError

# Resolving the jars downloads from Maven Central: a network hiccup should cost a retry, not
# a failed `dev up` (and with it a failed CI run).
MAVEN_ATTEMPTS = 3
MAVEN_RETRY_SECONDS = 5.0

KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
POSTGRES_MIN_MAJOR = 15

LOG4J2_CONFIG = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        Pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Logger:
      - name: kafka
        level: INFO
      - name: org.apache.kafka
        level: WARN
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
"""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    detail: str


def _log(message: str) -> None:
    print(f"dev: {message}", file=sys.stderr, flush=True)


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def _wait_until(predicate: object, timeout: float, what: str, log_file: Path) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    tail = ""
    with contextlib.suppress(OSError):
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
    raise DevEnvironmentError(f"{what} not ready after {timeout:.0f}s; end of {log_file}:\n{tail}")


class DevServices:
    """The local services of `settings` (ports come from the DSN and bootstrap servers)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.dev_dir.resolve()
        self.kafka_dir = self.root / "kafka"
        self.pg_dir = self.root / "postgres"

    # ---------------------------------------------------------------- Kafka
    @property
    def kafka_pid_file(self) -> Path:
        return self.kafka_dir / "kafka.pid"

    @property
    def kafka_log(self) -> Path:
        return self.kafka_dir / "kafka.log"

    def kafka_jars(self) -> Path:
        """The broker's jars, resolved once with Maven into a cache shared by checkouts."""
        jars = self.settings.kafka_jars_dir
        marker = jars / ".complete"
        if marker.exists():
            return jars
        if shutil.which("mvn") is None:
            raise DevEnvironmentError("mvn not found: install Maven (apt-get install maven)")
        jars.mkdir(parents=True, exist_ok=True)
        pom = resources.files("metering.devenv") / "kafka-pom.xml"
        with resources.as_file(pom) as pom_path:
            _log(f"resolving Kafka jars from Maven Central into {jars} (once)")
            for attempt in range(1, MAVEN_ATTEMPTS + 1):
                result = subprocess.run(
                    [
                        "mvn",
                        "-q",
                        "-B",
                        "-f",
                        str(pom_path),
                        "dependency:copy-dependencies",
                        f"-DoutputDirectory={jars}",
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if result.returncode == 0:
                    break
                if attempt == MAVEN_ATTEMPTS:
                    raise DevEnvironmentError(
                        f"mvn could not resolve Kafka ({MAVEN_ATTEMPTS} attempts; is Maven "
                        f"Central reachable?):\n{result.stdout[-2000:]}"
                    )
                delay = MAVEN_RETRY_SECONDS * attempt
                _log(f"mvn failed (attempt {attempt} of {MAVEN_ATTEMPTS}); again in {delay:.0f}s")
                time.sleep(delay)
        marker.touch()
        return jars

    def _kafka_properties(self) -> str:
        port = self.settings.kafka_port
        controller = self.settings.dev_kafka_controller_port
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.bootstrap.servers=127.0.0.1:{controller}",
                f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={self.kafka_dir / 'data'}",
                "num.partitions=1",
                "offsets.topic.replication.factor=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                # Topics are created by `dev up` with their partition counts; a typo in a
                # topic name must fail instead of creating a one-partition topic.
                "auto.create.topics.enable=false",
                "",
            ]
        )

    def kafka_running(self) -> int | None:
        return _read_pid(self.kafka_pid_file)

    def start_kafka(self) -> None:
        """Start the broker in the background unless it already runs; wait until it answers."""
        if self.kafka_running():
            return
        port = self.settings.kafka_port
        if _port_open(port):
            raise DevEnvironmentError(
                f"port {port} is taken by a process dev up did not start; stop it or set "
                "METERING_KAFKA_BOOTSTRAP_SERVERS to another port"
            )
        if shutil.which("java") is None:
            raise DevEnvironmentError(
                "java not found: install OpenJDK 17 (apt-get install openjdk-17-jre-headless)"
            )
        classpath = f"{self.kafka_jars()}/*"
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        properties = self.kafka_dir / "server.properties"
        properties.write_text(self._kafka_properties())
        (self.kafka_dir / "log4j2.yaml").write_text(LOG4J2_CONFIG)
        if not (self.kafka_dir / "data" / "meta.properties").exists():
            cluster_id = self.kafka_dir / "cluster.id"
            if not cluster_id.exists() or cluster_id.read_text().startswith("-"):
                cluster_id.write_text(_kafka_cluster_id())
            _log("formatting Kafka storage (KRaft, standalone controller)")
            result = subprocess.run(
                [
                    "java",
                    "-cp",
                    classpath,
                    STORAGE_TOOL,
                    "format",
                    "--standalone",
                    "-t",
                    cluster_id.read_text().strip(),
                    "-c",
                    str(properties),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise DevEnvironmentError(
                    f"Kafka storage format failed:\n{result.stdout}{result.stderr}"
                )
        _log(f"starting Kafka on 127.0.0.1:{port} (log: {self.kafka_log})")
        with self.kafka_log.open("ab") as log:
            process = subprocess.Popen(
                [
                    "java",
                    "-Xms512m",
                    "-Xmx512m",
                    "-XX:+UseG1GC",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={self.kafka_dir / 'log4j2.yaml'}",
                    "-cp",
                    classpath,
                    KAFKA_MAIN,
                    str(properties),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.kafka_pid_file.write_text(str(process.pid))
        _wait_until(
            lambda: process.poll() is None and _port_open(port), 90, "Kafka", self.kafka_log
        )
        asyncio.run(self._wait_kafka_ready())

    async def _wait_kafka_ready(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        deadline = time.monotonic() + 60
        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap_servers)
            try:
                await admin.start()
                await admin.list_topics()
                return
            except Exception as error:
                if time.monotonic() > deadline:
                    raise DevEnvironmentError(
                        f"Kafka does not answer metadata requests: {error}"
                    ) from error
                await asyncio.sleep(0.3)
            finally:
                await admin.close()

    def stop_kafka(self, *, kill: bool = False) -> bool:
        """Stop the broker `up` started (SIGTERM, or SIGKILL with kill=True). True if it ran."""
        pid = self.kafka_running()
        if pid is None:
            return False
        process = psutil.Process(pid)
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        self.kafka_pid_file.unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------- Postgres
    def postgres_bin(self) -> Path:
        """Debian's PostgreSQL server binaries, installed with apt-get when missing (as root)."""
        found = self._find_postgres_bin()
        if found is not None:
            return found
        if os.geteuid() != 0:
            raise DevEnvironmentError(
                "PostgreSQL server not installed: run apt-get install postgresql"
            )
        _log("installing Debian's postgresql package (apt-get)")
        env = child_environment({"DEBIAN_FRONTEND": "noninteractive"})
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "postgresql"],
        ):
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if result.returncode != 0:
                raise DevEnvironmentError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        found = self._find_postgres_bin()
        if found is None:
            raise DevEnvironmentError("postgresql installed but no server binaries found")
        return found

    @staticmethod
    def _find_postgres_bin() -> Path | None:
        candidates = []
        for entry in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"):
            with contextlib.suppress(ValueError):
                major = int(entry.parent.parent.name)
                if major >= POSTGRES_MIN_MAJOR:
                    candidates.append((major, entry.parent))
        return max(candidates)[1] if candidates else None

    def _as_postgres_user(self, command: list[str]) -> list[str]:
        # initdb and postgres refuse to run as root; the Debian package creates `postgres`.
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

    def postgres_running(self) -> int | None:
        return (
            _read_pid(self.pg_data / "postmaster.pid")
            if (self.pg_data / "postmaster.pid").exists()
            else None
        )

    def start_postgres(self) -> None:
        """Create the cluster once, start it on 127.0.0.1, create the service database."""
        port = self.settings.database_port
        if not self.postgres_running():
            if _port_open(port):
                raise DevEnvironmentError(
                    f"port {port} is taken by a PostgreSQL dev up did not start; stop it "
                    "(e.g. service postgresql stop) or point METERING_DATABASE_URL elsewhere"
                )
            bin_dir = self.postgres_bin()
            self.pg_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.pg_dir, "postgres", "postgres")
            socket_dir = self.pg_dir / "socket"
            if not (self.pg_data / "PG_VERSION").exists():
                _log(f"creating a PostgreSQL cluster in {self.pg_data}")
                result = subprocess.run(
                    self._as_postgres_user(
                        [
                            str(bin_dir / "initdb"),
                            "-D",
                            str(self.pg_data),
                            "-U",
                            "postgres",
                            "--auth=trust",
                            "-E",
                            "UTF8",
                            "--locale=C",
                        ]
                    ),
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if result.returncode != 0:
                    raise DevEnvironmentError(f"initdb failed:\n{result.stdout}{result.stderr}")
            subprocess.run(self._as_postgres_user(["mkdir", "-p", str(socket_dir)]), check=True)
            options = (
                f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={socket_dir} "
                "-c max_connections=200 -c shared_buffers=256MB -c fsync=on "
                "-c synchronous_commit=on -c max_wal_size=4GB -c checkpoint_timeout=15min"
            )
            _log(f"starting PostgreSQL on 127.0.0.1:{port} (log: {self.pg_log})")
            result = subprocess.run(
                self._as_postgres_user(
                    [
                        str(bin_dir / "pg_ctl"),
                        "-D",
                        str(self.pg_data),
                        "-l",
                        str(self.pg_log),
                        "-o",
                        options,
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ]
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                tail = (
                    self.pg_log.read_text(errors="replace")[-2000:] if self.pg_log.exists() else ""
                )
                raise DevEnvironmentError(
                    f"pg_ctl start failed:\n{result.stdout}{result.stderr}\n{tail}"
                )
        asyncio.run(self._ensure_database())

    async def _ensure_database(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = await asyncpg.connect(self.settings.admin_database_url(), timeout=5)
                break
            except (OSError, asyncpg.PostgresError) as error:
                if time.monotonic() > deadline:
                    raise DevEnvironmentError(
                        f"PostgreSQL does not accept connections: {error}"
                    ) from error
                await asyncio.sleep(0.2)
        try:
            name = self.settings.database_name
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                # CREATE DATABASE takes no parameters; the name is quoted as an identifier.
                quoted = await conn.fetchval("SELECT quote_ident($1)", name)
                await conn.execute(f"CREATE DATABASE {quoted}")
                _log(f"created database {name}")
        finally:
            await conn.close()

    async def recreate_database(self) -> None:
        """Drop the service database if it exists, create it empty and apply every migration.

        For tests and benchmarks: everything in that database is lost.
        """
        from metering.storage.migrations import migrate

        admin = await asyncpg.connect(self.settings.admin_database_url())
        try:
            # CREATE/DROP DATABASE take no parameters; the name is quoted as an identifier.
            quoted = await admin.fetchval("SELECT quote_ident($1)", self.settings.database_name)
            await admin.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {quoted}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(self.settings.database_url.get_secret_value())
        try:
            await migrate(conn)
        finally:
            await conn.close()

    def stop_postgres(self, *, mode: str = "fast") -> bool:
        """Stop the cluster `up` started (`fast`, or `immediate` to simulate a crash)."""
        if not self.postgres_running():
            return False
        bin_dir = self.postgres_bin()
        subprocess.run(
            self._as_postgres_user(
                [str(bin_dir / "pg_ctl"), "-D", str(self.pg_data), "-m", mode, "-w", "stop"]
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        return True

    # ---------------------------------------------------------------- all
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


def _kafka_cluster_id() -> str:
    """A random KRaft cluster id (22 characters of URL-safe base64), never starting with
    '-': the storage tool would read such an id as an option and refuse to format (1 run
    in 64 did, until this). Kafka's own Uuid.randomUuid avoids it the same way."""
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
