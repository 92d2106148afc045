"""The local Kafka broker: KRaft, one node, its jars resolved from Maven Central once."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import uuid
from importlib import resources
from pathlib import Path

import psutil

from metering.config import Settings
from metering.devenv.process import port_open, read_pid, say, wait_until
from metering.errors import DevEnvironmentError

# Resolving the jars downloads from Maven Central: a network hiccup should cost a retry, not
# a failed `dev up` (and with it a failed CI run).
MAVEN_ATTEMPTS = 3
MAVEN_RETRY_SECONDS = 5.0

KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

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


class KafkaService:
    """`DevServices`' Kafka half (it provides `settings` and `kafka_dir`)."""

    settings: Settings
    kafka_dir: Path

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
            say(f"resolving Kafka jars from Maven Central into {jars} (once)")
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
                say(f"mvn failed (attempt {attempt} of {MAVEN_ATTEMPTS}); again in {delay:.0f}s")
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
        return read_pid(self.kafka_pid_file)

    def start_kafka(self) -> None:
        """Start the broker in the background unless it already runs; wait until it answers."""
        if self.kafka_running():
            return
        port = self.settings.kafka_port
        if port_open(port):
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
            say("formatting Kafka storage (KRaft, standalone controller)")
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
        say(f"starting Kafka on 127.0.0.1:{port} (log: {self.kafka_log})")
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
        wait_until(lambda: process.poll() is None and port_open(port), 90, "Kafka", self.kafka_log)
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


def _kafka_cluster_id() -> str:
    """A random KRaft cluster id (22 characters of URL-safe base64), never starting with
    '-': the storage tool would read such an id as an option and refuse to format (1 run
    in 64 did, until this). Kafka's own Uuid.randomUuid avoids it the same way."""
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
