"""Validation cost per event, in process (no Kafka, no Postgres).

    .venv/bin/python -m bench.validate [--events 20000] [--rounds 5]

Runs `validate_event` over typical events (an api_call, the shape the HTTP benchmark
sends) and prints the best of several rounds in µs per event.
"""

from __future__ import annotations

import argparse
import time
import uuid
from datetime import UTC, datetime, timedelta

from metering.models import validate_event


def main(events: int, rounds: int) -> None:
    now = datetime.now(UTC)
    documents = [
        {
            "id": f"h{n}",
            "type": "api_call",
            "org_id": str(uuid.uuid4()),
            "quantity": 1,
            "occurred_at": now.isoformat(),
        }
        for n in range(events)
    ]
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for document in documents:
            validate_event(document, now=now, lateness_window=timedelta(days=35))
        best = min(best, (time.perf_counter() - started) / events)
    print(f"validate_event: {best * 1e6:.2f} µs per event (best of {rounds} x {events:,})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    main(args.events, args.rounds)
