"""`metering import FILE` end to end into usage_events, against `metering send --count` of
the same number (issue 40; target: the import ≥ 30,000 events/s).

Each run starts from a fresh database and topics with one `metering consume` running, starts
the command, and measures from its start until every event is stored (the consumer's own
per-transaction counts, ingest_batches; the aggregator does not run). Modes alternate
(import, send, import, send, ...) so that both see the same stretch of the host. The JSON
lines file holds `--events` synthetic events of 1,000 orgs over the last 20 days (five
types, no duplicates), written once before the runs.

    .venv/bin/python -m bench.import_file [--events 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import psutil

from bench.common import (
    ROOT,
    fresh_environment,
    machine,
    peak_rss_mib,
    record_result,
    start_metering,
    synthetic_events,
)

STORED_SO_FAR = "SELECT coalesce(sum(events), 0) FROM ingest_batches"


def cpu_of(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def services_cpu() -> dict[str, float]:
    """CPU seconds so far of PostgreSQL's processes and of the Kafka broker (Java)."""
    found = {"postgres": 0.0, "kafka": 0.0}
    for process in psutil.process_iter(["name"]):
        name = process.info["name"] or ""
        if name.startswith("postgres"):
            found["postgres"] += cpu_of(process)
        elif name == "java":
            found["kafka"] += cpu_of(process)
    return found


async def one_run(mode: str, file: Path, events: int, logs: Path) -> dict[str, float]:
    settings = await fresh_environment("metering_bench")
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    consumer = start_metering(
        settings, "consume", "--metrics-port", "0", log=logs / f"consume-{mode}.log"
    )
    try:
        await asyncio.sleep(3)  # the consumer joins its group before the clock starts
        args = (
            ["import", str(file)]
            if mode == "import"
            else ["send", "--count", str(events), "--orgs", "1000"]
        )
        services_from = services_cpu()
        consumer_from = cpu_of(psutil.Process(consumer.pid))
        started = time.perf_counter()
        command = subprocess.Popen(
            [sys.executable, "-m", "metering", *args],
            env=settings.child_environment(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=(logs / f"{mode}.log").open("wb"),
        )
        command_seconds = 0.0
        rss = 0.0
        command_cpu = 0.0
        watched = psutil.Process(command.pid)
        stored = 0
        while stored < events:
            await asyncio.sleep(0.25)
            if command.poll() is None:
                rss = max(rss, peak_rss_mib(command.pid))
                command_cpu = max(command_cpu, cpu_of(watched))
            elif not command_seconds:
                command_seconds = time.perf_counter() - started
                if command.returncode not in (0,):
                    sys.exit(f"{mode} exited {command.returncode}; log: {logs / f'{mode}.log'}")
            if consumer.poll() is not None:
                sys.exit(f"the consumer exited; log: {logs}")
            stored = await conn.fetchval(STORED_SO_FAR)
        seconds = time.perf_counter() - started
        services_to = services_cpu()
        consumer_cpu = cpu_of(psutil.Process(consumer.pid)) - consumer_from
        command.wait(timeout=60)
        command_seconds = command_seconds or seconds
        counted = await conn.fetchval("SELECT count(*) FROM usage_events")
        if counted != events:
            sys.exit(f"{mode}: usage_events holds {counted:,} rows, expected {events:,}")
    finally:
        consumer.terminate()
        consumer.wait(timeout=30)
        await conn.close()
    per_event = {
        "command": command_cpu,
        "consumer": consumer_cpu,
        **{name: services_to[name] - services_from[name] for name in services_to},
    }
    per_event = {name: cpu / events * 1e6 for name, cpu in per_event.items()}
    cores = psutil.cpu_count() or 1
    result = {
        "end_to_end_events_per_s": events / seconds,
        "command_events_per_s": events / command_seconds,
        "command_peak_rss_mib": rss,
        "cpu_us_per_event": sum(per_event.values()),
        # what the CPU measured allows on this box if every core were busy all the time
        "cpu_bound_events_per_s": cores * 1e6 / sum(per_event.values()),
        **{f"{name}_cpu_us": us for name, us in per_event.items()},
    }
    print(
        f"{mode:>6}: {events:,} events stored in {seconds:.1f}s = "
        f"{result['end_to_end_events_per_s']:,.0f} events/s end to end; the command took "
        f"{command_seconds:.1f}s ({result['command_events_per_s']:,.0f} events/s), "
        f"peak RSS {rss:.0f} MiB; CPU per event "
        + ", ".join(f"{name} {us:.1f} µs" for name, us in per_event.items())
        + f" = {result['cpu_us_per_event']:.1f} µs: at most "
        f"{result['cpu_bound_events_per_s']:,.0f} events/s on {cores} cores",
        flush=True,
    )
    return result


async def main(events: int, runs: int) -> None:
    print(f"machine: {machine()}", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-import-"))
    file = logs / "events.jsonl"
    messages, distinct = synthetic_events(events, 1000, 0.0)
    assert distinct == events
    with file.open("wb") as out:
        for _, value in messages:
            out.write(value + b"\n")
    del messages
    print(f"wrote {events:,} events to {file} ({file.stat().st_size / 2**20:.0f} MiB)")
    series: dict[str, list[dict[str, float]]] = {"import": [], "send": []}
    for _ in range(runs):
        for mode in ("import", "send"):
            series[mode].append(await one_run(mode, file, events, logs))
    figures: dict[str, object] = {"events": events, "runs": runs}
    for mode, results in series.items():
        for name in results[0]:
            values = [r[name] for r in results]
            figures[f"{mode}_{name}"] = statistics.median(values)
            figures[f"{mode}_{name}_range"] = [min(values), max(values)]
    ratio = figures["import_end_to_end_events_per_s"] / figures["send_end_to_end_events_per_s"]  # type: ignore[operator]
    figures["import_to_send_ratio"] = ratio
    print(
        f"medians of {runs}: import {figures['import_end_to_end_events_per_s']:,.0f} events/s "
        f"end to end, send --count {figures['send_end_to_end_events_per_s']:,.0f}; "
        f"ratio {ratio:.2f}; the import command alone "
        f"{figures['import_command_events_per_s']:,.0f} events/s"
    )
    record_result("import_file", f"-m bench.import_file --events {events} --runs {runs}", figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.events, arguments.runs))
