"""Ingestion benchmark: Kafka -> `metering consume` -> Postgres, against raw COPY.

    .venv/bin/python -m bench.ingest [--events 1000000] [--orgs 1000] [--duplicates 0.05]

1. publishes M synthetic events (5% re-sent duplicates) to a fresh topic, before timing;
2. starts `metering consume` and measures sustained ingestion from the first to the last
   committed batch (the `received_at` of the rows is their transaction's start time; the
   last batch's duration is added from the wall clock);
3. in the same run, COPYs the same rows into a fresh copy of the same table (the same
   migration applied in a separate schema: same partitions, same indexes) and times it;
4. prints both rates, their ratio, and the consumer's peak RSS;
5. reads the same topic once more with a bare aiokafka consumer that does nothing with the
   messages: the most any consumer built on aiokafka (FastStream's is) could do here, as a
   ceiling for the pipeline's rate and so for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import psutil
from aiokafka import AIOKafkaConsumer

from bench.common import (
    fresh_environment,
    machine,
    peak_rss_mib,
    publish_fast,
    start_metering,
    synthetic_events,
)
from metering.storage.migrations import bundled_migrations

COPY_COLUMNS = [
    "org_id",
    "event_id",
    "event_type",
    "user_id",
    "quantity",
    "occurred_at",
    "metadata",
    "source_partition",
    "source_offset",
]


STORED_SO_FAR = "SELECT coalesce(sum(events), 0) FROM ingest_batches"


def cpu_seconds_by_role(consumer_pids: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the consumers, by every PostgreSQL process
    (backends, WAL writer, checkpointer, autovacuum) and by the Kafka broker."""
    totals = {"consumer": 0.0, "postgres": 0.0, "kafka": 0.0}
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if process.info["pid"] in consumer_pids:
                role = "consumer"
            elif process.info["name"] == "postgres":
                role = "postgres"
            elif "kafka.Kafka" in (process.info["cmdline"] or []):
                role = "kafka"
            else:
                continue
            times = process.cpu_times()
            totals[role] += times.user + times.system
        except psutil.Error:
            continue  # a process that ended in between
    return totals


async def kafka_read_rate(bootstrap: str, topic: str, count: int) -> float:
    """Messages/s of a bare aiokafka consumer reading `count` messages of `topic`."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        started = time.perf_counter()
        seen = 0
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            seen += sum(len(messages) for messages in batches.values())
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


async def main(
    events: int, orgs: int, duplicates: float, batch_size: int, consumer_count: int
) -> dict[str, float]:
    settings = await fresh_environment("metering_bench")
    settings = settings.model_copy(update={"consumer_batch_size": batch_size})
    dsn = settings.database_url.get_secret_value()
    print(f"machine: {machine()}", flush=True)
    messages, distinct = synthetic_events(events, orgs, duplicates)
    started = time.perf_counter()
    await publish_fast(settings, messages)
    publish_seconds = time.perf_counter() - started
    print(
        f"published {events:,} messages ({distinct:,} distinct) in {publish_seconds:.1f}s "
        f"({events / publish_seconds:,.0f}/s)",
        flush=True,
    )
    del messages

    conn = await asyncpg.connect(dsn)
    log = Path(tempfile.mkstemp(prefix="bench-consumer-", suffix=".log")[1])
    consumers = [
        start_metering(settings, "consume", "--metrics-port", "0", log=log.with_suffix(f".{n}"))
        for n in range(consumer_count)
    ]
    try:
        stored = 0
        last_report = time.monotonic()
        cpu_from: tuple[int, dict[str, float]] | None = None
        while stored < distinct:
            await asyncio.sleep(0.25)
            if any(c.poll() is not None for c in consumers):
                sys.exit(f"a consumer exited; logs: {log}.*")
            # Progress from the consumer's per-transaction rows: a count(*) of usage_events
            # here took ~100 ms at 1M rows, 4 times a second, on the cores being measured.
            stored = await conn.fetchval(STORED_SO_FAR)
            if cpu_from is None and stored:
                # from the first stored rows on: the consumers' start-up is not ingestion
                cpu_from = (stored, cpu_seconds_by_role([c.pid for c in consumers]))
            if time.monotonic() - last_report > 5:
                print(f"  ... {stored:,} / {distinct:,} stored", flush=True)
                last_report = time.monotonic()
        done_wall = time.time()
        cpu_to = cpu_seconds_by_role([c.pid for c in consumers])
        rss = max(peak_rss_mib(c.pid) for c in consumers)
    finally:
        for consumer in consumers:
            consumer.send_signal(signal.SIGTERM)
        for consumer in consumers:
            consumer.wait(timeout=30)
    counted = await conn.fetchval("SELECT count(*) FROM usage_events")
    if counted != distinct:
        sys.exit(f"usage_events holds {counted:,} rows, expected {distinct:,} distinct events")
    first, last = await conn.fetchrow(
        "SELECT extract(epoch FROM min(received_at)), extract(epoch FROM max(received_at))"
        " FROM usage_events"
    )
    # received_at is the start of each batch's transaction; the last one ended before we saw it.
    pipeline_seconds = min(float(last) + 0.25, done_wall) - float(first)
    pipeline_rate = stored / pipeline_seconds

    # Raw COPY of the same rows into a fresh copy of the same table.
    await conn.execute("DROP SCHEMA IF EXISTS copybench CASCADE; CREATE SCHEMA copybench")
    core = next(m for m in bundled_migrations() if m.name.startswith("001"))
    await conn.execute("SET search_path = copybench, public")
    await conn.execute(core.sql)
    rows = await conn.fetch(f"SELECT {', '.join(COPY_COLUMNS)} FROM public.usage_events")
    records = [tuple(r) for r in rows]
    del rows
    await conn.execute("CHECKPOINT")
    started = time.perf_counter()
    await conn.copy_records_to_table(
        "usage_events", schema_name="copybench", records=records, columns=COPY_COLUMNS
    )
    copy_seconds = time.perf_counter() - started
    copy_rate = len(records) / copy_seconds
    await conn.execute("DROP SCHEMA copybench CASCADE")
    await conn.close()
    read_rate = await kafka_read_rate(
        settings.kafka_bootstrap_servers, settings.events_topic, events
    )
    result = {
        "events": events,
        "distinct": distinct,
        "pipeline_events_per_s": pipeline_rate,
        "copy_rows_per_s": copy_rate,
        "ratio": pipeline_rate / copy_rate,
        "consumer_peak_rss_mib": rss,
        "kafka_read_only_per_s": read_rate,
    }
    print(
        f"pipeline (Kafka -> consumer -> Postgres): {stored:,} events in {pipeline_seconds:.2f}s = "
        f"{pipeline_rate:,.0f} events/s"
    )
    print(
        f"raw COPY of the same rows into a fresh copy of usage_events: {copy_seconds:.2f}s = "
        f"{copy_rate:,.0f} rows/s"
    )
    print(f"ratio pipeline/COPY: {result['ratio']:.2f}")
    print(f"consumer peak RSS: {rss:.0f} MiB (max over {consumer_count} consumer processes)")
    if cpu_from is not None and stored > cpu_from[0]:
        measured_events = stored - cpu_from[0]
        per_event = {
            role: (cpu_to[role] - cpu_from[1][role]) / measured_events * 1e6 for role in cpu_to
        }
        result["cpu_us_per_event"] = sum(per_event.values())
        print(
            "CPU per stored event (user + system, from the first stored row to the last): "
            + ", ".join(f"{role} {us:.1f} µs" for role, us in per_event.items())
            + f"; total {sum(per_event.values()):.1f} µs on {psutil.cpu_count()} cores"
        )
    print(
        f"ceiling: a bare aiokafka consumer reading the same topic, doing nothing with it: "
        f"{read_rate:,.0f} messages/s = {read_rate / copy_rate:.2f} of the COPY rate"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--duplicates", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes in the group")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.orgs, args.duplicates, args.batch_size, args.consumers))
