"""Where a Python process's time goes, by part, from py-spy's raw (collapsed) stacks.

    .venv/bin/py-spy record -p PID -r 200 -f raw -o stacks.txt ...
    .venv/bin/python -m bench.profile_split stacks.txt [--events N]

Each sample is given to the part of its innermost frame that belongs to one (validation,
building rows, asyncpg, FastStream, aiokafka, metrics, logging); what is left is the event
loop and the rest. With `--events` (events stored while recording) it prints µs per event
from the sampling rate.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

PARTS: list[tuple[str, re.Pattern[str]]] = [
    (
        "decode and validate (metering.models, event_json, pydantic)",
        re.compile(r"metering/models\.py|metering/event_json\.py|pydantic|json/"),
    ),
    (
        "build rows (storage/events.py: _columns, metadata text)",
        re.compile(r"metering/storage/events\.py|IncomingEvent"),
    ),
    ("asyncpg (encode arrays, protocol)", re.compile(r"asyncpg/")),
    ("FastStream", re.compile(r"faststream/")),
    ("aiokafka (fetch, decode records)", re.compile(r"aiokafka/|kafka/")),
    ("metrics (prometheus_client)", re.compile(r"prometheus_client/")),
    ("logging", re.compile(r"logging/")),
    ("the consumer's own code (consumers/)", re.compile(r"consumers/")),
    ("peer: validation (pydantic)", re.compile(r"peer_consumer\.py.*model_validate")),
]


def split(lines: list[str]) -> tuple[Counter[str], int]:
    parts: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in reversed(frames):  # innermost first
            found = next((name for name, pattern in PARTS if pattern.search(frame)), None)
            if found:
                parts[found] += count
                break
        else:
            parts["event loop, sockets and the rest"] += count
    return parts, total


def main(path: Path, events: int | None, rate: int) -> None:
    parts, total = split(path.read_text().splitlines())
    for name, count in parts.most_common():
        share = count / total * 100
        per_event = f", {count / rate / events * 1e6:.1f} µs per event" if events else ""
        print(f"{share:5.1f}%  {name}{per_event}")
    print(f"{total} samples")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--rate", type=int, default=200, help="py-spy's samples per second")
    arguments = parser.parse_args()
    main(arguments.stacks, arguments.events, arguments.rate)
