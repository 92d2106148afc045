"""Prometheus for real: the shipped config and rules pass promtool, every process's
/metrics passes `promtool check metrics`, and Debian's prometheus scraping a running
consumer, aggregator and API sees every target up and the ingestion counters moving."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from metering.config import Settings
from tests.conftest import ROOT, ConsumerProcess, Server, async_wait_for, free_port

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool missing: scripts/test installs Debian's prometheus",
)


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS_DIR, input=stdin, capture_output=True, check=False
    )


def test_config_rules_and_rule_unit_tests_pass_promtool() -> None:
    for args in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


def query(prometheus: str, expression: str) -> float:
    body = json.loads(fetch(f"{prometheus}/api/v1/query?query={urllib.parse.quote(expression)}"))
    results = body["data"]["result"]
    return float(results[0]["value"][1]) if results else 0.0


@pytest.mark.services
@pytest.mark.slow
async def test_real_prometheus_scrapes_every_process(
    settings: Settings,
    server: Server,
    producer: AIOKafkaProducer,
    tmp_path: Path,
    start_consumer: Callable[..., ConsumerProcess],
    start_aggregator: Callable[[], int],
) -> None:
    consumer = start_consumer()
    aggregator_port = start_aggregator()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{PROMETHEUS_DIR / 'alerts.yml'}']\n"
        "scrape_configs:\n"
        f"  - {{job_name: metering-consumer, static_configs: [{{targets: ['127.0.0.1:{consumer.metrics_port}']}}]}}\n"
        f"  - {{job_name: metering-aggregator, static_configs: [{{targets: ['127.0.0.1:{aggregator_port}']}}]}}\n"
        f"  - {{job_name: metering-api, static_configs: [{{targets: ['{server.url.removeprefix('http://')}']}}]}}\n"
    )
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:

        async def all_up() -> bool:
            try:
                targets = json.loads(fetch(f"{url}/api/v1/targets"))["data"]["activeTargets"]
            except OSError:
                return False
            return len(targets) == 3 and all(t["health"] == "up" for t in targets)

        await async_wait_for(all_up, 60, "Prometheus to see all three targets up", interval=0.5)
        for target in (
            f"127.0.0.1:{consumer.metrics_port}",
            f"127.0.0.1:{aggregator_port}",
            server.url.removeprefix("http://"),
        ):
            lint = promtool("check", "metrics", stdin=fetch(f"http://{target}/metrics"))
            assert lint.returncode == 0 and not lint.stdout.strip(), (target, lint.stdout.decode())

        org = uuid.uuid4()
        for n in range(50):
            body = {
                "id": f"p{n}",
                "type": "api_call",
                "org_id": str(org),
                "occurred_at": datetime.now(UTC).isoformat(),
            }
            await producer.send_and_wait(
                settings.events_topic, json.dumps(body).encode(), key=str(org).encode()
            )

        async def stored_counted() -> bool:
            return query(url, 'metering_events_stored_total{job="metering-consumer"}') >= 50

        async def aggregated_counted() -> bool:
            return query(url, 'metering_events_aggregated_total{job="metering-aggregator"}') >= 50

        await async_wait_for(stored_counted, 30, "Prometheus to see 50 stored events")
        await async_wait_for(aggregated_counted, 30, "Prometheus to see 50 aggregated events")
        assert query(url, 'sum(up{job=~"metering-.*"})') == 3
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
