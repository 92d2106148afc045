"""Ingestion benchmark: Kafka -> `metering consume` -> Postgres, against raw COPY.

    .venv/bin/python -m bench.ingest [--events 1000000] [--orgs 1000] [--duplicates 0.05]

1. publishes M synthetic events (5% re-sent duplicates) to a fresh topic, before timing;
2. starts `metering consume` and measures sustained ingestion from the first to the last
   committed batch (the `received_at` of the rows is their transaction's start time; the
   last batch's duration is added from the wall clock);
3. in the same run, COPYs the same rows into a fresh copy of the same table (migration 001
   applied in a separate schema, with the indexes public.usage_events has now: same
   partitions, same indexes) and times it;
4. prints both rates, their ratio, and the consumer's peak RSS;
5. reads the same topic once more with a bare aiokafka consumer that does nothing with the
   messages: the most any consumer built on aiokafka (FastStream's is) could do here;
6. prints the ceiling of ANY exactly-once pipeline on this machine, from CPU measured in
   this run: per stored event, the least work such a pipeline cannot skip (read each
   message from Kafka, client and broker; validate it with pydantic, as the issue asks;
   write the row as COPY does; keep its (org_id, id) in a unique index, as COPY into the
   dedupe table does), spread perfectly over every core. Nothing else is counted (no
   FastStream, no encoding of rows for Postgres, no commits, no duplicate handling), so the
   real ceiling is lower still. A ceiling ratio below the target means the target cannot
   be met here by any consumer built this way.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
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
from metering.config import Settings
from metering.models import parse_event, utc_now
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
# The baseline table gets exactly the indexes public.usage_events has after every migration
# (008 replaced 001's BRIN index on ingest_xid by a btree). The definitions come from the
# catalog; "ON ONLY" is dropped so that each index is built on every partition too.
COPY_TABLE_INDEXES = r"""
SELECT regexp_replace(pg_get_indexdef(indexrelid),
                      ' ON (ONLY )?public\.usage_events ', ' ON copybench.usage_events ')
FROM pg_index WHERE indrelid = 'public.usage_events'::regclass
"""
BASELINE_OWN_INDEXES = """
SELECT indexrelid::regclass::text FROM pg_index
WHERE indrelid = 'copybench.usage_events'::regclass
"""


def cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds (user + system) `process` has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


def process_cpu_seconds(pid: int) -> float:
    return cpu_seconds(psutil.Process(pid))


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
            totals[role] += cpu_seconds(process)
        except psutil.Error:
            continue  # a process that ended in between
    return totals


def validation_cpu_us(values: list[bytes], settings: Settings) -> float:
    """CPU µs per message of `parse_event` (JSON decoding and pydantic validation), the
    consumer's own check, over `values` in this process."""
    now = utc_now()
    started = time.process_time()
    for value in values:
        parse_event(
            value,
            now=now,
            lateness_window=settings.lateness_window,
            future_tolerance=settings.future_tolerance,
        )
    return (time.process_time() - started) / len(values) * 1e6


@dataclass(frozen=True)
class KafkaRead:
    messages_per_s: float
    client_cpu_us: float  # per message, this process
    broker_cpu_us: float  # per message, the Kafka broker


@dataclass(frozen=True)
class Ceiling:
    """The least CPU per stored event any exactly-once pipeline spends here, and what it
    allows on `cores` cores."""

    per_event_us: dict[str, float]
    cores: int

    @property
    def events_per_s(self) -> float:
        return self.cores / sum(self.per_event_us.values()) * 1e6


async def kafka_read_rate(bootstrap: str, topic: str, count: int) -> KafkaRead:
    """A bare aiokafka consumer reading `count` messages of `topic`: its rate and the CPU
    it and the broker spent per message."""
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
        cpu_from = time.process_time()
        broker_from = cpu_seconds_by_role([])["kafka"]
        seen = 0
        while seen < count:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            seen += sum(len(messages) for messages in batches.values())
        return KafkaRead(
            seen / (time.perf_counter() - started),
            (time.process_time() - cpu_from) / seen * 1e6,
            (cpu_seconds_by_role([])["kafka"] - broker_from) / seen * 1e6,
        )
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
    # A sample of the very messages, for the in-process validation cost of the ceiling.
    sample = [value for _, value in messages[:: max(1, len(messages) // 100_000)]]
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
    for (index,) in await conn.fetch(BASELINE_OWN_INDEXES):
        await conn.execute(f"DROP INDEX {index}")
    for (definition,) in await conn.fetch(COPY_TABLE_INDEXES):
        await conn.execute(definition)
    rows = await conn.fetch(f"SELECT {', '.join(COPY_COLUMNS)} FROM public.usage_events")
    records = [tuple(r) for r in rows]
    del rows
    await conn.execute("CHECKPOINT")
    backend = conn.get_server_pid()
    server_from, client_from = process_cpu_seconds(backend), time.process_time()
    started = time.perf_counter()
    await conn.copy_records_to_table(
        "usage_events", schema_name="copybench", records=records, columns=COPY_COLUMNS
    )
    copy_seconds = time.perf_counter() - started
    copy_server_us = (process_cpu_seconds(backend) - server_from) / len(records) * 1e6
    copy_client_us = (time.process_time() - client_from) / len(records) * 1e6
    copy_rate = len(records) / copy_seconds
    # The least a unique (org_id, id) costs: COPY of the keys into a fresh dedupe table.
    keys = [(record[0], record[1]) for record in records]
    del records
    server_from = process_cpu_seconds(backend)
    await conn.copy_records_to_table(
        "usage_event_ids", schema_name="copybench", records=keys, columns=["org_id", "event_id"]
    )
    claim_server_us = (process_cpu_seconds(backend) - server_from) / len(keys) * 1e6
    await conn.execute("DROP SCHEMA copybench CASCADE")
    await conn.close()
    read = await kafka_read_rate(settings.kafka_bootstrap_servers, settings.events_topic, events)
    validation_us = validation_cpu_us(sample, settings)
    per_message = events / distinct  # every message is read and validated, duplicates too
    ceiling = Ceiling(
        {
            "Kafka read (client)": read.client_cpu_us * per_message,
            "Kafka read (broker)": read.broker_cpu_us * per_message,
            "validation": validation_us * per_message,
            "row, as COPY writes it": copy_server_us,
            "unique (org_id, id), as COPY writes it": claim_server_us,
        },
        psutil.cpu_count() or 1,
    )
    result = {
        "events": events,
        "distinct": distinct,
        "pipeline_events_per_s": pipeline_rate,
        "copy_rows_per_s": copy_rate,
        "ratio": pipeline_rate / copy_rate,
        "consumer_peak_rss_mib": rss,
        "kafka_read_only_per_s": read.messages_per_s,
        "ceiling_events_per_s": ceiling.events_per_s,
        "ceiling_ratio": ceiling.events_per_s / copy_rate,
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
        f"a bare aiokafka consumer reading the same topic, doing nothing with it: "
        f"{read.messages_per_s:,.0f} messages/s = {read.messages_per_s / copy_rate:.2f} "
        f"of the COPY rate"
    )
    print(
        f"COPY's CPU per row: server {copy_server_us:.1f} µs, client (asyncpg encoding) "
        f"{copy_client_us:.1f} µs"
    )
    print(
        "ceiling of any exactly-once pipeline here, CPU per stored event that none can skip: "
        + ", ".join(f"{part} {us:.1f} µs" for part, us in ceiling.per_event_us.items())
        + f"; total {sum(ceiling.per_event_us.values()):.1f} µs on {ceiling.cores} cores"
        f" = at most {ceiling.events_per_s:,.0f} events/s"
        f" = ratio {result['ceiling_ratio']:.2f}"
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
