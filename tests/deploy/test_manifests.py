"""What can be validated of deploy/ without a Docker engine or a cluster: the compose file
against the compose spec, the Kubernetes manifests against the 1.30 schemas, the consumer
never scaled past the partitions, probes where they belong, and a Grafana dashboard whose
every query names a metric we export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from metering.api.app import ApiMetrics
from metering.metrics import AggregatorMetrics, ConsumerMetrics, WebhookMetrics
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
BIN = ROOT / ".venv" / "bin"


def manifests() -> dict[tuple[str, str], dict]:  # type: ignore[type-arg]
    found = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    ok = run(
        BIN / "check-jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        DEPLOY / "docker-compose.yml",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert {"kafka", "postgres", "consumer", "aggregator", "api", "prometheus", "grafana"} <= set(
        services
    )
    broken = tmp_path / "broken.yml"
    broken.write_text(
        (DEPLOY / "docker-compose.yml")
        .read_text()
        .replace("    image: postgres:15", "    imgae: postgres:15")
    )
    assert (
        run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", broken).returncode
        != 0
    )


def test_kubernetes_manifests_match_their_schemas(tmp_path: Path) -> None:
    files = sorted((DEPLOY / "k8s").glob("*.yaml"))
    ok = run(BIN / "kubernetes-validate", "-k", "1.30.0", "--strict", *files)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        (DEPLOY / "k8s" / "api.yaml").read_text().replace("readinessProbe:", "readinessProbez:")
    )
    assert run(BIN / "kubernetes-validate", "-k", "1.30.0", "--strict", broken).returncode != 0


def test_consumer_never_exceeds_the_partitions_and_probes_are_wired() -> None:
    found = manifests()
    partitions = int(found[("ConfigMap", "metering")]["data"]["METERING_EVENTS_PARTITIONS"])
    assert found[("Deployment", "metering-consumer")]["spec"]["replicas"] <= partitions
    assert (
        found[("HorizontalPodAutoscaler", "metering-consumer")]["spec"]["maxReplicas"] <= partitions
    )
    api = found[("Deployment", "metering-api")]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert found[("Service", "metering-api")]["spec"]["selector"] == {
        "app.kubernetes.io/name": "metering-api"
    }
    # a leader and a hot standby (tests/aggregator/test_notifications.py shows the take-over)
    assert found[("Deployment", "metering-aggregator")]["spec"]["replicas"] == 2
    for kind, name in found:
        if kind == "Deployment":
            container = found[(kind, name)]["spec"]["template"]["spec"]["containers"][0]
            assert {"configMapRef": {"name": "metering"}} in container["envFrom"]
            assert {"secretRef": {"name": "metering-database"}} in container["envFrom"]


def exported_metric_names() -> set[str]:
    registries = [CollectorRegistry() for _ in range(4)]  # one per process, as deployed
    ConsumerMetrics(registries[0])
    AggregatorMetrics(registries[1])
    ApiMetrics(registries[2])
    WebhookMetrics(registries[3])
    names = {"up"}
    for family in (f for registry in registries for f in registry.collect()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_grafana_dashboard_queries_name_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "metering.json").read_text())
    exported = exported_metric_names()
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(expressions) >= 12
    functions = {"sum", "rate", "increase", "histogram_quantile", "max", "min", "by", "le"}
    for expression in expressions:
        names = {
            n
            for n in re.findall(r"\b([a-z_]+)\b(?=[{\[(\s)]|$)", expression)
            if n.startswith(("metering_", "up"))
        }
        assert names, expression
        assert names <= exported, (expression, names - exported)
        assert not (names & functions)
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in (
        "ingestion",
        "dead letters",
        "lag",
        "write latency",
        "freshness",
        "crossings",
        "api latency",
        "api errors",
    ):
        assert topic in titles, topic


def test_prometheus_configs_scrape_every_process() -> None:
    for name in ("prometheus.yml", "compose.yml"):
        config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        jobs = {job["job_name"] for job in config["scrape_configs"]}
        assert jobs == {
            "metering-consumer",
            "metering-aggregator",
            "metering-webhooks",
            "metering-api",
        }, name
