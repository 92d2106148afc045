"""Freshness and notification latency under a steady 5,000 events/s.

    .venv/bin/python -m bench.freshness [--rate 5000] [--seconds 60] [--meters] [--webhooks]

With `--meters`, 13 meters are created before the load on top of the 7 seeded ones (20
active meters: every kind, 3 with one or two dimensions of 10-50 values, 2 with filters)
and the load's events carry the metadata they read.

With `--webhooks`, two endpoints take limit.crossed: a healthy receiver on loopback and one
that accepts connections and never answers (every attempt times out after 10 s), and
`metering webhooks deliver` runs; the webhook latency is, per probe, the time its 80%
crossing reached the healthy receiver minus the probe's occurred_at.

Starts `metering consume` and `metering aggregate`, runs `bench.load` in its own process,
then measures, from the database and the limits topic:
- freshness: for every event, the commit time of the aggregation pass that counted it
  (aggregation_passes.finished_at) minus its occurred_at (set when it was produced);
  from then on the access check sees it;
- notification latency: for each probe (one crossing with a known cause), the time its
  usage.limits message reached a read_committed reader running through the load (crossings
  are published in Kafka transactions: visible at commit), minus the probe's occurred_at;
  also the message's Kafka timestamp (taken at send, before the commit) minus occurred_at.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer

from bench.common import ROOT, fresh_environment, machine, record_result, start_metering
from metering.topics import committed_reader
from metering.webhooks.signing import new_secret
from metering.webhooks.store import WebhookStore

PERCENTILES = """
WITH per_event AS (
    SELECT extract(epoch FROM (
        SELECT p.finished_at FROM aggregation_passes p WHERE p.to_xid > e.ingest_xid
        ORDER BY p.to_xid LIMIT 1) - e.occurred_at) AS seconds
    FROM usage_events e WHERE e.event_type = 'ai_tokens_used'
)
SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY seconds), max(seconds)
FROM per_event
"""


async def read_crossings(reader: AIOKafkaConsumer, seen: dict[str, tuple[float, float]]) -> None:
    """Record when each org's 80% crossing arrives (and its Kafka timestamp), until cancelled."""
    while True:
        for records in (await reader.getmany(timeout_ms=100)).values():
            received = time.time()
            for record in records:
                message = json.loads(record.value)
                if message["threshold_percent"] == 80:
                    seen.setdefault(message["org_id"], (received, record.timestamp / 1000))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(round(q * (len(ordered) - 1)), len(ordered) - 1)
    return ordered[index]


# The 13 meters of `--meters` (issue 37's benchmark), all on the load's event type.
EXTRA_METERS = [
    {"key": "tokens_sum", "aggregation": "sum"},
    {"key": "tokens_events", "aggregation": "count"},
    {"key": "latency_max", "aggregation": "max", "value": "metadata.latency_ms"},
    {"key": "tokens_latest", "aggregation": "latest"},
    {"key": "latency_latest", "aggregation": "latest", "value": "metadata.latency_ms"},
    {"key": "sessions", "aggregation": "unique_count", "value": "metadata.session"},
    {"key": "models", "aggregation": "unique_count", "value": "metadata.model"},
    {"key": "tokens_by_model", "aggregation": "sum", "group_by": ["model"]},
    {"key": "calls_by_endpoint", "aggregation": "count", "group_by": ["endpoint"]},
    {
        "key": "latency_by_region_model",
        "aggregation": "max",
        "value": "metadata.latency_ms",
        "group_by": ["region", "model"],
    },
    {"key": "prod_tokens", "aggregation": "sum", "filter": {"env": "prod"}},
    {
        "key": "prod_eu_events",
        "aggregation": "count",
        "filter": {"env": "prod", "region": ["r1", "r2", "r3"]},
    },
    {"key": "endpoint_count", "aggregation": "unique_count", "value": "metadata.endpoint"},
]


async def create_meters(dsn: str) -> None:
    from metering.meters.definition import MeterSpec
    from metering.meters.store import MeterStore

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        for spec in EXTRA_METERS:
            await MeterStore(pool).create(MeterSpec.parse({"event_type": "ai_tokens_used", **spec}))
    finally:
        await pool.close()


class Receivers:
    """A healthy webhook receiver (records when each 80% crossing arrived, by org) and one
    that accepts connections and never answers, both on loopback."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                at = time.time()
                message = json.loads(body)
                if message["data"]["threshold_percent"] == 80:
                    receiver.arrived.setdefault(message["data"]["org_id"], at)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                return

        self.healthy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.healthy.daemon_threads = True
        threading.Thread(target=self.healthy.serve_forever, daemon=True).start()
        self.silent = socket.socket()
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(1024)  # accepted by the kernel, never read or answered

    def urls(self) -> list[str]:
        return [
            f"http://127.0.0.1:{self.healthy.server_address[1]}/hook",
            f"http://127.0.0.1:{self.silent.getsockname()[1]}/hook",
        ]

    def close(self) -> None:
        self.healthy.shutdown()
        self.silent.close()


async def add_endpoints(dsn: str, urls: list[str]) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        store = WebhookStore(pool)
        for url in urls:
            await store.add_endpoint(url, None, ["limit.crossed"], "bench", new_secret(), "bench")
    finally:
        await pool.close()


async def main(rate: int, seconds: float, meters: bool, webhooks: bool = False) -> None:
    settings = await fresh_environment("metering_bench_fresh")
    dsn = settings.database_url.get_secret_value()
    print(f"machine: {machine()}", flush=True)
    if meters:
        await create_meters(dsn)
        print(f"20 active meters: the 7 seeded and {len(EXTRA_METERS)} more", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-fresh-"))
    consumer = start_metering(settings, "consume", "--metrics-port", "0", log=logs / "consume.log")
    aggregator = start_metering(
        settings, "aggregate", "--metrics-port", "0", log=logs / "aggregate.log"
    )
    receivers = Receivers() if webhooks else None
    deliverer = None
    if receivers is not None:
        await add_endpoints(dsn, receivers.urls())
        deliverer = start_metering(
            settings.model_copy(update={"webhook_allow_private": True}),
            "webhooks",
            "deliver",
            "--metrics-port",
            "0",
            log=logs / "webhooks.log",
        )
        print("2 webhook endpoints: one healthy, one that never answers", flush=True)
    await asyncio.sleep(5)  # both joined and idle
    reader = committed_reader(settings, settings.limits_topic)
    await reader.start()
    seen: dict[str, tuple[float, float]] = {}  # org -> (received, Kafka timestamp), at 80%
    reading = asyncio.create_task(read_crossings(reader, seen))
    load = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "bench.load",
            "--topic",
            settings.events_topic,
            "--bootstrap",
            settings.kafka_bootstrap_servers,
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            *(["--metadata"] if meters else []),
        ],
        env=settings.child_environment(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    output, _ = await load.communicate()
    if load.returncode != 0:
        raise SystemExit(f"bench.load failed with exit status {load.returncode}")
    lines = output.decode().splitlines()
    probes = [line.split()[1] for line in lines if line.startswith("probe ")]
    print(lines[-1], f"({len(probes)} probes)", flush=True)
    conn = await asyncpg.connect(dsn)
    expected = int(lines[-1].split()[1]) + len(probes)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lag = await conn.fetchval(
            "SELECT count(*) FROM usage_events e, aggregator_state s WHERE e.ingest_xid >= s.watermark_xid"
        )
        stored = await conn.fetchval("SELECT count(*) FROM usage_events")
        if stored >= expected and lag == 0:
            break
        await asyncio.sleep(0.5)
    meters_lag = None
    if meters:  # how far the meter passes are behind when the v1 pass has caught up
        caught_up_at = time.monotonic()
        deadline = caught_up_at + 300
        while time.monotonic() < deadline:
            behind = await conn.fetchval(
                "SELECT count(*) FROM usage_events e, aggregator_state s "
                "WHERE s.name = 'meters' AND e.ingest_xid >= s.watermark_xid"
            )
            if behind == 0:
                break
            await asyncio.sleep(1)
        meters_lag = time.monotonic() - caught_up_at
        print(
            f"meters: caught up {meters_lag:.0f} s after the v1 pass"
            if behind == 0
            else f"meters: {behind:,} events still not counted {meters_lag:.0f} s after the v1 pass"
        )
    count, p50, p99, worst = await conn.fetchrow(PERCENTILES)
    print(
        f"freshness (produced -> aggregated, visible to the access check) over {count:,} events: "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms"
    )

    probe_times = {
        str(r["org_id"]): r["occurred_at"].timestamp()
        for r in await conn.fetch(
            "SELECT org_id, occurred_at FROM usage_events WHERE event_id = 'probe'"
        )
    }
    end = time.monotonic() + 15
    while time.monotonic() < end and len(seen.keys() & probe_times.keys()) < len(probes):
        await asyncio.sleep(0.2)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await reader.stop()
    received = [seen[org][0] - at for org, at in probe_times.items() if org in seen]
    stamped = [seen[org][1] - at for org, at in probe_times.items() if org in seen]
    if received:
        print(
            f"notification latency (crossing event produced -> usage.limits message received by "
            f"a read_committed reader) over {len(received)} of {len(probes)} probes: "
            f"p50 {percentile(received, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(received, 0.99) * 1000:.0f} ms, max {max(received) * 1000:.0f} ms; "
            f"to the message's Kafka timestamp: p50 {percentile(stamped, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(stamped, 0.99) * 1000:.0f} ms"
        )
    else:
        print("notification latency: no probe crossing arrived")
    hooked: list[float] = []
    if receivers is not None:
        end = time.monotonic() + 15
        while time.monotonic() < end and len(receivers.arrived.keys() & probe_times.keys()) < len(
            probes
        ):
            await asyncio.sleep(0.2)
        hooked = [
            receivers.arrived[org] - at
            for org, at in probe_times.items()
            if org in receivers.arrived
        ]
        if hooked:
            print(
                f"webhook latency (crossing event produced -> the healthy endpoint received it, "
                f"the other one timing out meanwhile) over {len(hooked)} of {len(probes)} "
                f"probes: p50 {percentile(hooked, 0.5) * 1000:.0f} ms, "
                f"p99 {percentile(hooked, 0.99) * 1000:.0f} ms, max {max(hooked) * 1000:.0f} ms"
            )
        else:
            print("webhook latency: no probe crossing reached the healthy endpoint")
        receivers.close()
    record_result(
        "freshness",
        f"python -m bench.freshness --rate {rate} --seconds {seconds:g}"
        + (" --meters" if meters else "")
        + (" --webhooks" if webhooks else ""),
        {
            "active_meters": 7 + (len(EXTRA_METERS) if meters else 0),
            "events": count,
            "freshness_p50_ms": round(p50 * 1000),
            "freshness_p99_ms": round(p99 * 1000),
            "notification_p50_ms": round(percentile(received, 0.5) * 1000) if received else None,
            "notification_p99_ms": round(percentile(received, 0.99) * 1000) if received else None,
            "probes": len(probes),
            "probes_received": len(received),
            "meters_caught_up_after_s": round(meters_lag) if meters_lag is not None else None,
            "webhook_p50_ms": round(percentile(hooked, 0.5) * 1000) if hooked else None,
            "webhook_p99_ms": round(percentile(hooked, 0.99) * 1000) if hooked else None,
            "webhooks_received": len(hooked),
        },
    )
    await conn.close()
    processes = [consumer, aggregator, *([deliverer] if deliverer is not None else [])]
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--meters", action="store_true", help="20 active meters, see above")
    parser.add_argument("--webhooks", action="store_true", help="two endpoints, see above")
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.seconds, args.meters, args.webhooks))
