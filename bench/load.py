"""Load generator (its own process): steady usage events at a fixed rate, plus probes.

    python -m bench.load --rate 5000 --seconds 60 [--probes-per-second 4]

Every event's occurred_at is the moment it is handed to the producer, so downstream
latency can be measured against it. A probe is one api_call of quantity 800 for a fresh
organization (free plan: 80% of 1000), i.e. exactly one threshold crossing whose cause
has a known time. Probe org ids are printed on stdout, one per line, prefixed `probe`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer


async def main(
    bootstrap: str,
    topic: str,
    rate: int,
    seconds: float,
    probes_per_second: float,
    metadata: bool = False,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    rng = random.Random(5)
    orgs = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(1000)]
    tick = 0.01
    per_tick = rate * tick
    started = time.monotonic()
    sent = 0
    next_probe = started
    try:
        while (now := time.monotonic()) - started < seconds:
            due = int((now - started) / tick * per_tick) - sent
            for _ in range(max(due, 0)):
                org = orgs[rng.randrange(1000)]
                body = {
                    "id": uuid.uuid4().hex,
                    "type": "ai_tokens_used",
                    "org_id": org,
                    "quantity": rng.randint(1, 5),
                    "occurred_at": datetime.now(UTC).isoformat(),
                }
                if metadata:  # what the meters of `bench.freshness --meters` read
                    body["metadata"] = {
                        "model": f"m{rng.randrange(20)}",
                        "endpoint": f"/v1/e{rng.randrange(50)}",
                        "region": f"r{rng.randrange(10)}",
                        "env": "prod" if rng.random() < 0.7 else "staging",
                        "latency_ms": rng.randrange(1, 900),
                        "session": f"s{rng.randrange(5000)}",
                    }
                await producer.send(topic, json.dumps(body).encode(), key=org.encode())
                sent += 1
            if probes_per_second and now >= next_probe:
                org = str(uuid.uuid4())
                body = {
                    "id": "probe",
                    "type": "api_call",
                    "org_id": org,
                    "quantity": 800,
                    "occurred_at": datetime.now(UTC).isoformat(),
                }
                await producer.send(topic, json.dumps(body).encode(), key=org.encode())
                print(f"probe {org}", flush=True)
                next_probe += 1 / probes_per_second
            await asyncio.sleep(tick)
        await producer.flush()
    finally:
        await producer.stop()
    print(f"sent {sent} events in {time.monotonic() - started:.1f}s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--probes-per-second", type=float, default=4)
    parser.add_argument("--metadata", action="store_true", help="events carry metadata")
    args = parser.parse_args()
    asyncio.run(
        main(
            args.bootstrap,
            args.topic,
            args.rate,
            args.seconds,
            args.probes_per_second,
            args.metadata,
        )
    )
