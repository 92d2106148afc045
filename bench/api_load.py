"""HTTP load generator (its own process) for bench.api.

    python -m bench.api_load check  --url U --key K --orgs-file F --rate 1000 --seconds 30
    python -m bench.api_load ingest --url U --key K --events 200000 --batch 500 --concurrency 4

`check` is open-loop: a request is started every 1/rate s whatever the answers do, so a
slow server shows up as latency, not as a lower rate. Prints JSON with the latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, datetime

import httpx


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def check(url: str, key: str, orgs: list[str], rate: int, seconds: float) -> None:
    """Open loop over keep-alive connections: request n is due at start + n/rate; its
    latency runs from that due time, so time spent queued in this client counts too."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    total = int(rate * seconds)
    due: asyncio.Queue[tuple[int, float]] = asyncio.Queue()

    def request(n: int) -> bytes:
        return (
            f"GET /v1/orgs/{orgs[n % len(orgs)]}/features/max_api_calls_per_month HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {key}\r\n\r\n"
        ).encode()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for n in range(20):  # warm-up, not measured
            await _get(reader, writer, request(n))
        while True:
            n, due_at = await due.get()
            if n < 0:
                break
            status = await _get(reader, writer, request(n))
            latencies.append(time.perf_counter() - due_at)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(32)]
    await asyncio.sleep(1)
    begin = time.perf_counter()
    for n in range(total):
        due_at = begin + n / rate
        delay = due_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait((n, due_at))
    for _ in workers:
        due.put_nowait((-1, 0.0))
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - begin
    ordered = sorted(latencies)
    print(
        json.dumps(
            {
                "requests": len(latencies),
                "achieved_rate": len(latencies) / elapsed,
                "statuses": statuses,
                "p50_ms": statistics.median(ordered) * 1000,
                "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1000,
                "max_ms": ordered[-1] * 1000,
            }
        )
    )


async def ingest(url: str, key: str, events: int, batch: int, concurrency: int) -> None:
    orgs = [str(uuid.uuid4()) for _ in range(1000)]
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for start in range(0, events, batch):
            queue.put_nowait(start)
        failures = 0

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                start = queue.get_nowait()
                now = datetime.now(UTC).isoformat()
                body = [
                    {
                        "id": f"h{start + i}",
                        "type": "api_call",
                        "org_id": orgs[(start + i) % 1000],
                        "quantity": 1,
                        "occurred_at": now,
                    }
                    for i in range(min(batch, events - start))
                ]
                response = await client.post("/v1/events", json=body)
                if response.status_code != 202:
                    failures += 1

        begin = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        print(
            json.dumps(
                {
                    "events": events,
                    "accepted_seconds": time.perf_counter() - begin,
                    "failed_requests": failures,
                    "started_at": time.time() - (time.perf_counter() - begin),
                }
            )
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["check", "ingest"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--orgs-file")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    if args.mode == "check":
        with open(args.orgs_file) as handle:
            org_ids = handle.read().split()
        asyncio.run(check(args.url, args.key, org_ids, args.rate, args.seconds))
    else:
        asyncio.run(ingest(args.url, args.key, args.events, args.batch, args.concurrency))
