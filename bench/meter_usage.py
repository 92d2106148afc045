"""Meters on one big organization: backfill of new meters, and usage queries under load.

    .venv/bin/python -m bench.meter_usage [--events 1000000] [--rates 50,100,200] [--seconds 15]

1. Stores `--events` events of one organization (zone Europe/Berlin) spread over this
   month so far, in SQL (`api_call` with metadata endpoint (50 values), model (20), region
   (10)), and aggregates them.
2. Creates two meters after the fact (`calls_by_endpoint`: count by endpoint;
   `tokens_by_model`: sum by model) and times their backfill by the aggregator against a
   plain `GROUP BY` of the same rows into a temporary table, in the same run.
3. Serves the API (`metering serve`) and sends an open-loop load of each of `--rates`
   requests/s for `--seconds` of each query kind: day windows over the month with group_by
   one dimension (from the rollups), and hour windows over the last 6 hours (computed from
   raw events; over 7 days the range holds more events than the raw path reads, and the
   API refuses it, which is printed). Prints the latency percentiles measured by the client
   (from each request's due time), and errors.

Appends the figures to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
from prometheus_client import CollectorRegistry

from aggregator.service import Aggregator
from aggregator.store import AggregateStore
from bench.common import fresh_environment, machine, record_result, start_metering
from metering.meters.definition import MeterSpec
from metering.meters.store import MeterStore
from metering.metrics import AggregatorMetrics
from metering.storage.keys import KeyStore

ORG = uuid.UUID("5b0e8e3a-6a57-4c8e-9f59-1c1b1d9e3a01")
INSERT_EVENTS = """
INSERT INTO usage_events (org_id, event_id, event_type, quantity, occurred_at, metadata)
SELECT $1, 'u' || g, 'api_call', 1 + g % 5,
       $2::timestamptz + (($3::timestamptz - $2::timestamptz) * (g::float8 / $4)),
       jsonb_build_object('endpoint', '/v1/e' || (g % 50), 'model', 'm' || (g % 20),
                          'region', 'r' || (g % 10))
FROM generate_series(1, $4::bigint) AS g
"""
PLAIN_GROUP_BY = """
CREATE TEMP TABLE plain AS
SELECT (occurred_at AT TIME ZONE 'Europe/Berlin')::date AS day, metadata ->> 'endpoint' AS e,
       count(*) AS n
FROM usage_events WHERE event_type = 'api_call' AND org_id = $1
GROUP BY 1, 2
"""


async def settle(aggregator: Aggregator) -> float:
    started = time.perf_counter()
    while True:
        result = await aggregator.run_once(publish=False)
        if result.events == 0 and not aggregator.backfilling:
            return time.perf_counter() - started


async def open_loop(
    port: int, key: str, path: str, params: dict[str, str], rate: int, seconds: float
) -> tuple[list[float], int]:
    """Open loop over 32 keep-alive connections (raw HTTP/1.1, so the client costs little
    CPU): request n is due at start + n/rate and its latency runs from then, so a slow
    server shows up as latency, not as a lower rate."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    request = (
        f"GET {path}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    errors = 0
    due: asyncio.Queue[float] = asyncio.Queue()

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (due_at := await due.get()) >= 0:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - due_at)
            if head.split(b" ", 2)[1] != b"200":
                errors += 1
        writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(32)]
    begin = time.perf_counter() + 0.5
    for n in range(int(rate * seconds)):
        due_at = begin + n / rate
        delay = due_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait(due_at)
    for _ in workers:
        due.put_nowait(-1.0)
    await asyncio.gather(*workers)
    return latencies, errors


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000


async def main(events: int, rates: list[int], seconds: float) -> None:
    settings = await fresh_environment("metering_bench_usage")
    dsn = settings.database_url.get_secret_value()
    print(f"machine: {machine()}", flush=True)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, command_timeout=None)
    assert pool is not None
    now = datetime.now(UTC)
    month_start = datetime(now.year, now.month, 1, tzinfo=UTC)
    await pool.execute(
        "INSERT INTO org_subscriptions (org_id, plan, timezone) VALUES ($1, 'enterprise', $2)",
        ORG,
        "Europe/Berlin",
    )
    started = time.perf_counter()
    await pool.execute(INSERT_EVENTS, ORG, month_start + timedelta(hours=2), now, events)
    await pool.execute("ANALYZE usage_events")
    print(f"stored {events:,} events in {time.perf_counter() - started:.1f} s", flush=True)
    aggregator = Aggregator(
        settings, AggregateStore(pool), None, AggregatorMetrics(CollectorRegistry())
    )
    print(f"v1 aggregation: {await settle(aggregator):.1f} s", flush=True)
    meters = MeterStore(pool)
    for spec in (
        {"key": "calls_by_endpoint", "aggregation": "count", "group_by": ["endpoint"]},
        {"key": "tokens_by_model", "aggregation": "sum", "group_by": ["model"]},
    ):
        await meters.create(MeterSpec.parse({"event_type": "api_call", **spec}))
    backfill = await settle(aggregator)
    async with pool.acquire() as conn:
        started = time.perf_counter()
        await conn.execute(PLAIN_GROUP_BY, ORG)
        plain = time.perf_counter() - started
    print(
        f"backfill of 2 meters over {events:,} events: {backfill:.2f} s; plain GROUP BY of "
        f"the same rows (one meter's grouping): {plain:.2f} s; ratio per meter "
        f"{backfill / 2 / plain:.2f}",
        flush=True,
    )
    key, _ = await KeyStore(pool).create(["read"], ORG)
    await pool.close()

    port = 18080
    logs = Path(tempfile.mkdtemp(prefix="bench-usage-"))
    server = start_metering(settings, "serve", "--port", str(port), log=logs / "serve.log")
    figures: dict[str, object] = {
        "events": events,
        "backfill_s": round(backfill, 3),
        "plain_group_by_s": round(plain, 3),
        "seconds": seconds,
    }
    try:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
        ) as client:
            for _ in range(100):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
            path = f"/v1/orgs/{ORG}/meters/calls_by_endpoint/usage"
            day = {"window": "day", "group_by": "endpoint"}
            week = {
                "window": "hour",
                "from": (now - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "to": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "group_by": "",
            }
            refused = await client.get(path, params=week)
            print(f"hour windows over 7 days: {refused.status_code} {refused.json().get('reason')}")
            figures["hour_7_days_status"] = refused.status_code
            hours = {
                **week,
                "from": (now - timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            for name, params in (("day_month_group_by", day), ("hour_6_hours", hours)):
                one = time.perf_counter()
                first = await client.get(path, params=params)
                single = time.perf_counter() - one
                if first.status_code != 200:  # e.g. 6 hours over the raw path's event cap
                    print(f"{name}: {first.status_code} {first.json().get('reason')}")
                    figures[name] = {"status": first.status_code}
                    continue
                rows = len(first.json()["rows"])
                print(f"{name}: {rows} rows; one request alone {single * 1000:.0f} ms", flush=True)
                series = {}
                for rate in rates:
                    latencies, errors = await open_loop(port, key, path, params, rate, seconds)
                    print(
                        f"  at {rate}/s open loop for {seconds:.0f} s: p50 "
                        f"{pct(latencies, 0.5):.0f} ms, p99 {pct(latencies, 0.99):.0f} ms, max "
                        f"{max(latencies) * 1000:.0f} ms, {errors} errors",
                        flush=True,
                    )
                    series[str(rate)] = {
                        "p50_ms": round(pct(latencies, 0.5), 1),
                        "p99_ms": round(pct(latencies, 0.99), 1),
                        "errors": errors,
                    }
                    if pct(latencies, 0.99) > 5000:
                        break  # saturated: higher rates only queue longer
                figures[name] = {"rows": rows, "single_ms": round(single * 1000, 1), **series}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    record_result(
        "meter_usage",
        f"python -m bench.meter_usage --events {events} --rates {','.join(map(str, rates))} "
        f"--seconds {seconds:g}",
        figures,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rates", default="50,100,200", help="requests/s, in turn")
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    asyncio.run(main(args.events, [int(r) for r in args.rates.split(",")], args.seconds))
