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
        stored = 0
        while stored < events:
            await asyncio.sleep(0.25)
            if command.poll() is None:
                rss = max(rss, peak_rss_mib(command.pid))
            elif not command_seconds:
                command_seconds = time.perf_counter() - started
                if command.returncode not in (0,):
                    sys.exit(f"{mode} exited {command.returncode}; log: {logs / f'{mode}.log'}")
            if consumer.poll() is not None:
                sys.exit(f"the consumer exited; log: {logs}")
            stored = await conn.fetchval(STORED_SO_FAR)
        seconds = time.perf_counter() - started
        command.wait(timeout=60)
        command_seconds = command_seconds or seconds
        counted = await conn.fetchval("SELECT count(*) FROM usage_events")
        if counted != events:
            sys.exit(f"{mode}: usage_events holds {counted:,} rows, expected {events:,}")
    finally:
        consumer.terminate()
        consumer.wait(timeout=30)
        await conn.close()
    result = {
        "end_to_end_events_per_s": events / seconds,
        "command_events_per_s": events / command_seconds,
        "command_peak_rss_mib": rss,
    }
    print(
        f"{mode:>6}: {events:,} events stored in {seconds:.1f}s = "
        f"{result['end_to_end_events_per_s']:,.0f} events/s end to end; the command took "
        f"{command_seconds:.1f}s ({result['command_events_per_s']:,.0f} events/s), "
        f"peak RSS {rss:.0f} MiB",
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
        for name in ("end_to_end_events_per_s", "command_events_per_s", "command_peak_rss_mib"):
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
