"""The consumer a user would write by hand instead of adopting this service (issue 38): the
peer `bench.ingest` measures the pipeline against, on the same topic and events.

    python -m bench.peer_consumer --dsn DSN --bootstrap HOST:PORT --topic T --group G --messages N

aiokafka `getmany` of up to 5,000 messages, `model_validate_json` of a plain pydantic model,
COPY into a temporary table and `INSERT ... SELECT ... ON CONFLICT (org_id, id) DO NOTHING`
into a table with that primary key and an `(org_id, occurred_at)` index, one transaction per
batch, offsets committed after it. A message that does not validate is dropped; nothing else
(no dead letters, lateness or future checks, exact decimals, retries or bookkeeping): a worse
product, measured only for its rate.

Prints `first <unix time>` after its first committed batch (the bench starts counting CPU
there) and, once it has read N messages, one JSON line: stored, seconds from the first
batch's start to the last commit, and its own CPU seconds after the first batch with the
events stored after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel, ValidationError

TABLE = """
CREATE SCHEMA IF NOT EXISTS peer;
DROP TABLE IF EXISTS peer.events;
CREATE TABLE peer.events (
    org_id      uuid        NOT NULL,
    id          text        NOT NULL,
    type        text        NOT NULL,
    user_id     uuid,
    quantity    numeric     NOT NULL,
    occurred_at timestamptz NOT NULL,
    metadata    jsonb,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX ON peer.events (org_id, occurred_at);
"""
STAGE = "CREATE TEMP TABLE batch (LIKE peer.events) ON COMMIT DELETE ROWS"
MOVE = "INSERT INTO peer.events SELECT * FROM batch ON CONFLICT (org_id, id) DO NOTHING"
COLUMNS = ["org_id", "id", "type", "user_id", "quantity", "occurred_at", "metadata"]


class Event(BaseModel):
    id: str
    type: str
    org_id: UUID
    user_id: UUID | None = None
    quantity: Decimal = Decimal(1)
    occurred_at: datetime
    metadata: dict[str, Any] | None = None


async def main(dsn: str, bootstrap: str, topic: str, group: str, messages: int) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(TABLE)
    await conn.execute(STAGE)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    seen = stored = first_stored = 0
    first_wall = first_cpu = 0.0
    try:
        while seen < messages:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if not batches:
                continue
            began = time.time()
            rows = []
            for partition_messages in batches.values():
                for message in partition_messages:
                    seen += 1
                    try:
                        event = Event.model_validate_json(message.value or b"")
                    except ValidationError:
                        continue
                    rows.append(
                        (
                            event.org_id,
                            event.id,
                            event.type,
                            event.user_id,
                            event.quantity,
                            event.occurred_at,
                            None if event.metadata is None else json.dumps(event.metadata),
                        )
                    )
            async with conn.transaction():
                await conn.copy_records_to_table("batch", records=rows, columns=COLUMNS)
                result = await conn.execute(MOVE)
            stored += int(result.rsplit(" ", 1)[1])
            await consumer.commit()
            if not first_wall:
                first_wall, first_cpu, first_stored = began, time.process_time(), stored
                print(f"first {began}", flush=True)
        print(
            json.dumps(
                {
                    "stored": stored,
                    "seconds": time.time() - first_wall,
                    "stored_after_first_batch": stored - first_stored,
                    "cpu_seconds_after_first_batch": time.process_time() - first_cpu,
                }
            ),
            flush=True,
        )
    finally:
        await consumer.stop()
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--messages", type=int, required=True)
    arguments = parser.parse_args()
    asyncio.run(
        main(
            arguments.dsn,
            arguments.bootstrap,
            arguments.topic,
            arguments.group,
            arguments.messages,
        )
    )
