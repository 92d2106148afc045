"""The time bound of the shared validator on hostile input (issue 42), in process.

    .venv/bin/python -m bench.adversarial [--rounds 7]

For each class of input that once froze the API or stopped the consumer (huge exponents,
thousands of digits, deep nesting, NaN) and for the most expensive inputs that are still
valid (16 KiB of decimals, 16 KiB of nested objects), prints the median time `parse_event`
takes per message over several rounds, and how long `events_from_body` blocks the event
loop for a request of 1,000 of the worst valid events (the largest body the API accepts).
Appends the series to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from metering.api.ingest import events_from_body
from metering.errors import InvalidEvent
from metering.models import parse_event

RESULTS = Path(__file__).with_name("results.jsonl")
ORG = "00000000-0000-4000-8000-000000000001"


def event(now: datetime, fragment: str = "") -> bytes:
    extra = fragment + "," if fragment else ""
    return (
        "{" + extra + f'"id":"a1","type":"api_call","org_id":"{ORG}",'
        f'"occurred_at":"{now.isoformat()}"' + "}"
    ).encode()


def inputs(now: datetime) -> dict[str, bytes]:
    decimals = ",".join(["1.5"] * 4000)
    objects = '{"a":' * 31 + "1" + "}" * 31
    return {
        "typical event": event(now, '"quantity":3,"metadata":{"endpoint":"/v1/x"}'),
        "metadata 1e600000": event(now, '"metadata":{"x":1e600000}'),
        "metadata 1e9999999999999999999": event(now, '"metadata":{"x":1e9999999999999999999}'),
        "metadata 5,000-digit integer": event(now, '"metadata":{"x":' + "9" * 5000 + "}"),
        "metadata 400-character decimal": event(
            now, '"metadata":{"x":0.' + "0" * 300 + "1" * 60 + "e-5}"
        ),
        "quantity 1e-999999999": event(now, '"quantity":1e-999999999'),
        "quantity 31 digits": event(now, '"quantity":1234567890123456789012345678901'),
        "metadata NaN": event(now, '"metadata":{"x":NaN}'),
        "nesting 1,200 deep": event(now, '"metadata":{"x":' + "[" * 1200 + "]" * 1200 + "}"),
        "nesting 8,000 deep (parser limit)": event(now, '"metadata":{"x":' + "[" * 8000 + "}"),
        "valid: 16 KiB of decimals": event(now, '"metadata":{"x":[' + decimals + "]}"),
        "valid: 16 KiB of objects 32 deep": event(
            now, '"metadata":{' + ",".join(f'"k{n}":{objects}' for n in range(60)) + "}"
        ),
    }


def time_one(raw: bytes, now: datetime, repeat: int) -> tuple[float, str]:
    outcome = "accepted"
    started = time.perf_counter()
    for _ in range(repeat):
        try:
            parse_event(raw, now=now, lateness_window=timedelta(days=35))
        except InvalidEvent as error:
            outcome = error.code
    return (time.perf_counter() - started) / repeat, outcome


def main(rounds: int) -> None:
    now = datetime.now(UTC)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    series: dict[str, dict[str, object]] = {}
    print(f"{'input':40} {'bytes':>7} {'median µs':>10} {'max µs':>9}  outcome")
    for name, raw in inputs(now).items():
        times, outcome = [], ""
        for _ in range(rounds):
            took, outcome = time_one(raw, now, 20)
            times.append(took * 1e6)
        series[name] = {
            "bytes": len(raw),
            "median_us": round(statistics.median(times), 1),
            "max_us": round(max(times), 1),
            "outcome": outcome,
        }
        print(
            f"{name:40} {len(raw):>7} {statistics.median(times):>10.1f} {max(times):>9.1f}"
            f"  {outcome}"
        )
    worst = inputs(now)["valid: 16 KiB of decimals"].decode()
    body = ("[" + ",".join(worst.replace('"a1"', f'"a{n}"') for n in range(1000)) + "]").encode()
    blocks = []
    for _ in range(max(3, rounds // 2)):
        started = time.perf_counter()
        events_from_body(
            body,
            "application/json",
            now=now,
            lateness_window=timedelta(days=35),
            future_tolerance=timedelta(minutes=5),
        )
        blocks.append(time.perf_counter() - started)
    print(
        f"events_from_body, 1,000 x 16 KiB of decimals ({len(body) / 2**20:.1f} MiB): "
        f"median {statistics.median(blocks) * 1e3:.0f} ms, max {max(blocks) * 1e3:.0f} ms"
    )
    with RESULTS.open("a") as results:
        results.write(
            json.dumps(
                {
                    "bench": "adversarial",
                    "at": now.isoformat(timespec="seconds"),
                    "commit": commit,
                    "rounds": rounds,
                    "parse_event": series,
                    "largest_request_ms": {
                        "median": round(statistics.median(blocks) * 1e3, 1),
                        "max": round(max(blocks) * 1e3, 1),
                    },
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    main(parser.parse_args().rounds)
