"""What one stored event costs PostgreSQL, part by part, against COPY of the same rows.

    .venv/bin/python -m bench.write_cost [--events 300000] [--chunk 5000]

Each step writes `--events` fresh rows in transactions of `--chunk` rows (the consumer's
shape) into a freshly migrated database and reports the backend's CPU time per event (user +
system, read from /proc for the server process of the connection), the client's CPU time
per event (building the statement's arrays and asyncpg encoding them) and the wall rate:

1. COPY into usage_events: the benchmark baseline of bench.ingest, per chunk;
2. the events half of the write statement alone (INSERT .. SELECT FROM unnest);
3. the dedupe half alone (claim (org_id, id) in usage_event_ids, ON CONFLICT DO NOTHING);
4. the write statement the consumer runs (claim + store in one statement);
5. the same statement again on the same ids: every event a duplicate;
6. and 7. the other design: one unpartitioned table whose primary key is the dedupe key
   (org_id, event_id), written by COPY and by INSERT .. ON CONFLICT DO NOTHING. What the
   ratio of bench.ingest could be if usage_events gave up monthly partitions.

The server's CPU per event bounds the pipeline's rate whatever the consumer does: one
transaction runs on one backend, and this machine has two cores for Postgres, Kafka and the
consumer together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import asyncpg

from bench.common import fresh_environment, machine
from metering.storage.events import STORE_NEW_EVENTS

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

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
EVENT_TYPES = ["api_call", "record_created", "automation_run", "ai_tokens_used"]
# The rows of a chunk, as the write statement (STORE_NEW_EVENTS) reads them.
INCOMING_EVENTS = """
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[],
                     $6::timestamptz[], $7::text[], $8::int[], $9::bigint[])
    AS t(org_id, event_id, event_type, user_id, quantity, occurred_at, metadata,
         source_partition, source_offset)
"""
SINGLE_TABLE = """
CREATE TABLE events_single (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE events_single ADD PRIMARY KEY (org_id, event_id);
CREATE INDEX ON events_single (org_id, occurred_at);
CREATE INDEX ON events_single (ingest_xid);
"""


def store_into(table: str, on_conflict: str = "") -> str:
    """INSERT .. SELECT of a chunk's rows into `table`, as the write statement stores them."""
    return f"""
INSERT INTO {table} (org_id, event_id, event_type, user_id, quantity, occurred_at,
                     metadata, source_partition, source_offset)
SELECT org_id, event_id, event_type, user_id, quantity::numeric, occurred_at, metadata::jsonb,
       source_partition, source_offset
FROM ({INCOMING_EVENTS}) AS i
{on_conflict}
"""


STORE_ONLY = store_into("usage_events")
STORE_SINGLE = store_into("events_single", "ORDER BY org_id, event_id ON CONFLICT DO NOTHING")
CLAIM_ONLY = f"""
INSERT INTO usage_event_ids (org_id, event_id)
SELECT org_id, event_id FROM ({INCOMING_EVENTS}) AS i ORDER BY 1, 2
ON CONFLICT DO NOTHING
"""

Row = tuple[uuid.UUID, str, str, None, str, datetime, None, int, int]


def backend_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def synthetic_rows(prefix: str, count: int) -> list[Row]:
    orgs = [uuid.UUID(int=n + 1) for n in range(1000)]
    now = datetime.now(UTC)
    return [
        (
            orgs[n % 1000],
            f"{prefix}-{n}",
            EVENT_TYPES[n % 4],
            None,
            str(1 + n % 50),
            now - timedelta(seconds=n % 86400),
            None,
            n % 6,
            n,
        )
        for n in range(count)
    ]


class Step(NamedTuple):
    label: str
    rows: list[Row]
    statement: str | None = None  # the statement to run per chunk, or
    copy_into: str = ""  # the table to COPY each chunk into


async def write_chunks(conn: asyncpg.Connection, step: Step, chunk: int) -> None:
    rows = step.rows
    for first in range(0, len(rows), chunk):
        part = rows[first : first + chunk]
        async with conn.transaction():
            if step.statement is None:
                await conn.copy_records_to_table(
                    step.copy_into,
                    records=[(*r[:4], Decimal(r[4]), *r[5:]) for r in part],
                    columns=COPY_COLUMNS,
                )
            else:
                await conn.execute(
                    step.statement, *[list(column) for column in zip(*part, strict=True)]
                )


async def measure(conn: asyncpg.Connection, step: Step, chunk: int) -> None:
    pid = conn.get_server_pid()
    server, client, wall = backend_cpu_seconds(pid), time.process_time(), time.perf_counter()
    await write_chunks(conn, step, chunk)
    server = backend_cpu_seconds(pid) - server
    client = time.process_time() - client
    wall = time.perf_counter() - wall
    count = len(step.rows)
    print(
        f"{step.label:44} server {server / count * 1e6:5.1f} µs/event   "
        f"client {client / count * 1e6:5.1f} µs/event   {count / wall:8,.0f} events/s",
        flush=True,
    )


async def main(events: int, chunk: int) -> None:
    settings = await fresh_environment("metering_bench_write_cost")
    print(f"machine: {machine()}", flush=True)
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    await conn.execute(SINGLE_TABLE)
    await conn.execute("CHECKPOINT")
    stored = synthetic_rows("s", events)
    steps = [
        Step("1. COPY into usage_events", synthetic_rows("c", events), copy_into="usage_events"),
        Step("2. store only (INSERT .. unnest)", synthetic_rows("u", events), STORE_ONLY),
        Step("3. claim ids only (usage_event_ids)", synthetic_rows("i", events), CLAIM_ONLY),
        Step("4. write statement: claim + store", stored, STORE_NEW_EVENTS),
        Step("5. write statement, every event a duplicate", stored, STORE_NEW_EVENTS),
        Step(
            "6. one table keyed (org_id, id): COPY",
            synthetic_rows("k", events),
            copy_into="events_single",
        ),
        Step(
            "7. one table keyed: INSERT .. ON CONFLICT", synthetic_rows("m", events), STORE_SINGLE
        ),
    ]
    for step in steps:
        await measure(conn, step, chunk)
    await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--chunk", type=int, default=5000)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.chunk))
