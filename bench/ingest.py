"""Ingestion benchmark: Kafka -> `metering consume` -> Postgres, against the consumer a
user would write by hand (issue 38), on the same topic and events, in the same run.

    .venv/bin/python -m bench.ingest [--events 1000000] [--orgs 1000] [--duplicates 0.05] [--runs 1]

Per run:
1. publishes M synthetic events (5% re-sent duplicates) to a fresh topic, before timing;
2. starts `metering consume` and measures sustained ingestion from the first to the last
   committed batch (the `received_at` of the rows is their transaction's start time; the
   last batch's duration is added from the wall clock), with the CPU per stored event of
   the consumer, PostgreSQL and Kafka from the first stored row to the last, and the
   consumer's peak RSS;
3. runs the hand-written peer (`bench/peer_consumer.py`: aiokafka getmany, a plain pydantic
   model's `model_validate_json`, COPY into a temporary table + INSERT ... ON CONFLICT (org_id,
   id) DO NOTHING, offsets committed after) on the same topic with a group of its own, after
   a CHECKPOINT, with the same CPU accounting;
4. prints both rates, their ratio (pipeline / peer; issue 38's target: ≥ 1.3) and the CPU
   per event of each process.

The earlier comparison with raw COPY and the ceiling of any exactly-once pipeline are a
decision record now (docs/decisions/0006-ingest-ceiling.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.common import (
    ROOT,
    fresh_environment,
    machine,
    peak_rss_mib,
    publish_fast,
    record_result,
    start_metering,
    synthetic_events,
)
from metering.config import Settings

STORED_SO_FAR = "SELECT coalesce(sum(events), 0) FROM ingest_batches"


def cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds (user + system) `process` has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


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


def start_profile(pid: int, out: Path | None) -> subprocess.Popen[bytes] | None:
    """py-spy sampling `pid` 200 times a second into `out` (raw stacks), when asked."""
    if out is None:
        return None
    return subprocess.Popen(
        [
            str(ROOT / ".venv" / "bin" / "py-spy"),
            "record",
            "-p",
            str(pid),
            "-r",
            "200",
            "-f",
            "raw",
            "-o",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profile(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(timeout=60)


async def run_peer(
    settings: Settings, events: int, profile: Path | None = None
) -> dict[str, float]:
    """The hand-written peer on the events topic (a group of its own): its rate and the CPU
    per stored event of it, PostgreSQL and Kafka, from its first committed batch on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.peer_consumer",
        "--dsn",
        settings.database_url.get_secret_value(),
        "--bootstrap",
        settings.kafka_bootstrap_servers,
        "--topic",
        settings.events_topic,
        "--group",
        f"{settings.consumer_group}-peer",
        "--messages",
        str(events),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    cpu_from: dict[str, float] | None = None
    summary: dict[str, float] = {}
    profiler = None
    async for line in process.stdout:
        text = line.decode().strip()
        if text.startswith("first "):
            cpu_from = cpu_seconds_by_role([process.pid])
            profiler = start_profile(process.pid, profile)
        elif text.startswith("{"):
            summary = json.loads(text)
            cpu_to = cpu_seconds_by_role([process.pid])
            stop_profile(profiler)
    if await process.wait() != 0 or cpu_from is None or not summary:
        sys.exit("the peer consumer failed")
    after = summary["stored_after_first_batch"]
    per_event = {
        role: (cpu_to[role] - cpu_from[role]) / after * 1e6 for role in ("postgres", "kafka")
    }
    per_event["peer"] = summary["cpu_seconds_after_first_batch"] / after * 1e6
    return {
        "stored": summary["stored"],
        "rate": summary["stored"] / summary["seconds"],
        **{f"cpu_us_{role}": us for role, us in per_event.items()},
    }


async def one_run(
    events: int,
    orgs: int,
    duplicates: float,
    batch_size: int,
    consumer_count: int,
    profile: Path | None = None,
) -> dict[str, Any]:
    settings = await fresh_environment("metering_bench")
    settings = settings.model_copy(update={"consumer_batch_size": batch_size})
    dsn = settings.database_url.get_secret_value()
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
        profiler = None
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
                profiler = start_profile(
                    consumers[0].pid, None if profile is None else profile / "consumer.txt"
                )
            if time.monotonic() - last_report > 5:
                print(f"  ... {stored:,} / {distinct:,} stored", flush=True)
                last_report = time.monotonic()
        done_wall = time.time()
        cpu_to = cpu_seconds_by_role([c.pid for c in consumers])
        stop_profile(profiler)
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
    assert cpu_from is not None and stored > cpu_from[0]
    measured = stored - cpu_from[0]
    pipeline_cpu = {role: (cpu_to[role] - cpu_from[1][role]) / measured * 1e6 for role in cpu_to}
    await conn.execute("CHECKPOINT")  # the peer starts from a clean checkpoint too
    await conn.close()

    peer = await run_peer(settings, events, None if profile is None else profile / "peer.txt")
    if peer["stored"] != distinct:
        sys.exit(f"the peer stored {peer['stored']:,} events, expected {distinct:,}")
    result = {
        "events": events,
        "distinct": distinct,
        "pipeline_events_per_s": round(pipeline_rate),
        "peer_events_per_s": round(peer["rate"]),
        "ratio": round(pipeline_rate / peer["rate"], 3),
        "consumer_peak_rss_mib": round(rss, 1),
        "pipeline_cpu_us": {k: round(v, 1) for k, v in pipeline_cpu.items()},
        "peer_cpu_us": {
            "peer": round(peer["cpu_us_peer"], 1),
            "postgres": round(peer["cpu_us_postgres"], 1),
            "kafka": round(peer["cpu_us_kafka"], 1),
        },
    }
    print(
        f"pipeline (Kafka -> metering consume -> Postgres): {pipeline_rate:,.0f} events/s; "
        f"CPU per stored event: "
        + ", ".join(f"{role} {us:.1f} µs" for role, us in pipeline_cpu.items())
        + f"; peak RSS {rss:.0f} MiB"
    )
    print(
        f"hand-written peer (COPY loop): {peer['rate']:,.0f} events/s; CPU per stored event: "
        f"peer {peer['cpu_us_peer']:.1f} µs, postgres {peer['cpu_us_postgres']:.1f} µs, "
        f"kafka {peer['cpu_us_kafka']:.1f} µs"
    )
    print(f"ratio pipeline / peer: {pipeline_rate / peer['rate']:.2f} (target ≥ 1.3)", flush=True)
    if profile is not None:
        from bench.profile_split import main as split

        for name, count in (("consumer", measured), ("peer", peer["stored"])):
            print(f"-- {name}: py-spy samples by part (events counted: {count:,.0f})")
            split(profile / f"{name}.txt", int(count), 200)
    return result


async def main(
    events: int,
    orgs: int,
    duplicates: float,
    batch_size: int,
    consumer_count: int,
    runs: int,
    profile: Path | None,
) -> None:
    print(f"machine: {machine()}", flush=True)
    results = []
    for run in range(runs):
        print(f"run {run + 1} of {runs}", flush=True)
        results.append(await one_run(events, orgs, duplicates, batch_size, consumer_count, profile))
        record_result(
            "ingest",
            f"python -m bench.ingest --events {events} --orgs {orgs} --runs {runs}",
            results[-1],
        )
    if runs > 1:
        ratios = sorted(r["ratio"] for r in results)
        print(
            f"median of {runs} runs: pipeline "
            f"{statistics.median(r['pipeline_events_per_s'] for r in results):,.0f}, peer "
            f"{statistics.median(r['peer_events_per_s'] for r in results):,.0f} events/s; "
            f"ratio {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--duplicates", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes in the group")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="a directory: py-spy the consumer and the peer, and split their time by part",
    )
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    asyncio.run(
        main(
            args.events,
            args.orgs,
            args.duplicates,
            args.batch_size,
            args.consumers,
            args.runs,
            args.profile,
        )
    )
