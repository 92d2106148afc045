"""HTTP API benchmarks, with the load generator in its own process (bench.api_load).

    .venv/bin/python -m bench.api [--rate 1000] [--seconds 30] [--events 200000] [--shaped]

With `--shaped`, limits shaped per organization (contract section 8): every organization
has a billing anchor (so the check reads its cycle from up to 31 day rows, 40 days of them
stored) and every third one an override (soft, four thresholds).

1. Access check: GET /v1/orgs/{org}/features/max_api_calls_per_month at a fixed rate
   (open loop) over 1,000 organizations with aggregated usage; p50/p99 as the client saw them.
2. Ingestion: POST /v1/events in batches of 500 (4 concurrent requests) with the consumer
   running; events/s from the first request to the last event stored in usage_events.
Each is preceded by a short warm-up that is not reported (5 s of checks; 20,000 events).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import psutil

from bench.common import ROOT, fresh_environment, machine, record_result, start_metering
from metering.storage.keys import KeyStore

SEED_USAGE = """
INSERT INTO org_subscriptions (org_id, plan)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
       (ARRAY['free','pro','business','enterprise'])[1 + g % 4]
FROM generate_series(0, 999) g;
INSERT INTO usage_aggregations (org_id, event_type, period, period_start, value, event_count)
SELECT s.org_id, 'api_call', 'month', date_trunc('month', now())::date, 500, 500
FROM org_subscriptions s;
"""


WARM_UP_EVENTS = 20_000

SEED_SHAPED = """
UPDATE org_subscriptions
SET billing_anchor = (date_trunc('month', now()) + (abs(hashtext(org_id::text)) % 28)
                      * interval '1 day')::date;
INSERT INTO usage_aggregations (org_id, event_type, period, period_start, value, event_count)
SELECT s.org_id, 'api_call', 'day', (now() - d * interval '1 day')::date, 20, 20
FROM org_subscriptions s, generate_series(0, 39) d;
INSERT INTO org_limit_overrides (org_id, feature_key, limit_value, soft, thresholds)
SELECT org_id, 'max_api_calls_per_month', 200000, true, '{50,80,100,150}'
FROM org_subscriptions WHERE abs(hashtext(org_id::text)) % 3 = 0;
"""


def run_load(mode: str, url: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    """bench.api_load in its own process; its JSON result on stdout."""
    return subprocess.run(
        [sys.executable, "-m", "bench.api_load", mode, "--url", url, "--key", key, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def wait_for_events(conn: asyncpg.Connection, count: int) -> None:
    deadline = time.monotonic() + 120
    while (
        await conn.fetchval("SELECT count(*) FROM usage_events") < count
        and time.monotonic() < deadline
    ):
        await asyncio.sleep(0.2)


async def main(rate: int, seconds: float, events: int, workers: int, shaped: bool = False) -> None:
    settings = await fresh_environment("metering_bench_api")
    print(f"machine: {machine()}", flush=True)
    dsn = settings.database_url.get_secret_value()
    conn = await asyncpg.connect(dsn)
    await conn.execute(SEED_USAGE)
    if shaped:
        await conn.execute(SEED_SHAPED)
        await conn.execute("ANALYZE")
        print("limits shaped: every org anchored (cycles), a third with an override", flush=True)
    orgs = [str(r["org_id"]) for r in await conn.fetch("SELECT org_id FROM org_subscriptions")]
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    key, _ = await KeyStore(pool).create(["admin"], None, "bench")
    await pool.close()
    logs = Path(tempfile.mkdtemp(prefix="bench-api-"))
    orgs_file = logs / "orgs.txt"
    orgs_file.write_text("\n".join(orgs))
    port = 18080
    server = subprocess.Popen(
        [sys.executable, "-m", "metering", "serve", "--port", str(port)],
        env=settings.child_environment(),
        cwd=ROOT,
        stdout=(logs / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    await asyncio.sleep(3)
    try:
        # Warm-up (not reported): the JVM's JIT in Kafka, the server's caches, pools.
        run_load(
            "check", url, key, "--orgs-file", str(orgs_file), "--rate", str(rate), "--seconds", "5"
        )
        result = run_load(
            "check",
            url,
            key,
            "--orgs-file",
            str(orgs_file),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
        )
        check = json.loads(result.stdout)
        print(
            f"access check at {rate}/s for {seconds:.0f}s: achieved {check['achieved_rate']:.0f}/s, "
            f"p50 {check['p50_ms']:.2f} ms, p99 {check['p99_ms']:.2f} ms, max {check['max_ms']:.1f} ms, "
            f"statuses {check['statuses']}",
            flush=True,
        )
        record_result(
            "api_access_check",
            f"-m bench.api --rate {rate} --seconds {seconds:g}" + (" --shaped" if shaped else ""),
            {
                "shaped": shaped,
                "rate": rate,
                "achieved_rate": round(check["achieved_rate"]),
                "p50_ms": round(check["p50_ms"], 2),
                "p99_ms": round(check["p99_ms"], 2),
                "statuses": check["statuses"],
            },
        )

        consumer = start_metering(
            settings, "consume", "--metrics-port", "0", log=logs / "consume.log"
        )
        await asyncio.sleep(4)
        run_load(
            "ingest",
            url,
            key,
            "--events",
            str(WARM_UP_EVENTS),
            "--batch",
            "500",
            "--concurrency",
            "4",
        )
        await wait_for_events(conn, WARM_UP_EVENTS)
        cpu_before = cpu_seconds(server.pid), cpu_seconds(consumer.pid)
        result = run_load(
            "ingest", url, key, "--events", str(events), "--batch", "500", "--concurrency", "4"
        )
        load = json.loads(result.stdout)
        await wait_for_events(conn, WARM_UP_EVENTS + events)
        api_cpu = cpu_seconds(server.pid) - cpu_before[0]
        consumer_cpu = cpu_seconds(consumer.pid) - cpu_before[1]
        last = await conn.fetchval("SELECT extract(epoch FROM max(received_at)) FROM usage_events")
        stored = await conn.fetchval("SELECT count(*) FROM usage_events") - WARM_UP_EVENTS
        span = float(last) + 0.2 - load["started_at"]
        print(
            f"ingestion over HTTP, batches of 500: {stored:,} events stored in {span:.2f}s = "
            f"{stored / span:,.0f} events/s end to end (HTTP accepted all in "
            f"{load['accepted_seconds']:.2f}s = {events / load['accepted_seconds']:,.0f}/s; "
            f"failed requests {load['failed_requests']})",
            flush=True,
        )
        # CPU time per event is steadier than a rate on a shared host: it does not count
        # the time a process waited for a core.
        print(
            f"CPU per event: API {api_cpu / events * 1e6:.1f} µs, "
            f"consumer {consumer_cpu / events * 1e6:.1f} µs",
            flush=True,
        )
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=30)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=1, help="metering serve --workers")
    parser.add_argument("--shaped", action="store_true", help="anchors and overrides, see above")
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.seconds, args.events, args.workers, args.shaped))
