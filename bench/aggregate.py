"""Aggregation benchmarks on 10M events, each against a plain GROUP BY in the same run.

    .venv/bin/python -m bench.aggregate [--events 10000000] [--increment 100000] [--rounds 3]
                                        [--pass-rounds N]

1. Full re-aggregation: `aggregate_usage('day'|'month', ...)` over all events against
   `CREATE TEMP TABLE .. AS SELECT .. GROUP BY` of the same rows at the same granularity
   (both write their result; ours also deletes the old rows, handles time zones, gauges
   and distinct users). Rounds alternate; medians are reported.
2. Incremental pass: insert `--increment` new events on top, then time one aggregator pass
   (day + month rows, limit checks, watermark) against the same plain GROUP BY over just
   those new rows (selected the same way, by transaction id), and for context against a
   GROUP BY that makes both periods the pass writes (the day groups and the month rows
   rolled up from them). Repeated `--pass-rounds` times (default: `--rounds`) after one
   untimed warm-up pass (a running aggregator's connection has its statements prepared),
   for two shapes of new events:
   - live: occurred in the last 10 minutes, as events arrive from running services;
   - backfill: spread over the last 60 days like the base data (late events, imports),
     which touches a day row for almost every new event's (org, day).
   Printed: the ratio of the medians, and the median of each round's ratio (pass and
   GROUP BY of the same round, so that a slow spell of the host weighs on both).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from aggregator.service import decide_crossings
from aggregator.store import AggregateStore
from bench.common import fresh_environment, machine

ORGS = 1000
SIXTY_DAYS = 60 * 86400
INCREMENT_SPREADS = {"live": 600, "backfill": SIXTY_DAYS}
ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Asia/Tokyo", "Australia/Sydney"]
# Synthetic events in SQL (the consumer path is measured by bench.ingest): 1000 orgs,
# 90% sums, 5% storage gauges, 5% user_active over 500 users, spread over the last $4
# seconds (60 days for the base data).
GENERATE = """
INSERT INTO usage_events (org_id, event_id, event_type, user_id, quantity, occurred_at)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g % 1000), 12, '0'))::uuid,
       'g' || $3 || '-' || g,
       CASE WHEN g % 20 = 0 THEN 'storage_used' WHEN g % 20 = 1 THEN 'user_active'
            ELSE (ARRAY['api_call','record_created','automation_run','schedule_executed',
                        'ai_tokens_used'])[1 + g % 5] END,
       CASE WHEN g % 20 = 1
            THEN ('00000000-0000-4000-9000-' || lpad(to_hex(g % 500), 12, '0'))::uuid END,
       CASE WHEN g % 20 = 0 THEN (g * 7919) % 1000000000 ELSE 1 + g % 50 END,
       now() - ((g * 104729) % $4::bigint) * interval '1 second'
FROM generate_series($1::bigint, $2::bigint) AS g
"""
TUNED = (
    "SET LOCAL work_mem = '64MB'; SET LOCAL jit = off; SET LOCAL enable_nestloop = off; "
    "SET LOCAL enable_sort = off"
)
PLAIN_GROUP_BY = """
CREATE TEMP TABLE plain_result AS
SELECT org_id, event_type, date_trunc('{period}', occurred_at) AS period_start,
       sum(quantity) AS value, count(*) AS events
FROM usage_events {where}
GROUP BY 1, 2, 3
"""

# The rows of both periods, as the pass writes them (contract: day and month aggregates):
# the day groups, and the month rows rolled up from them, as one would write it by hand.
# (GROUPING SETS was the first version of this baseline; PostgreSQL plans it as a sort of
# every event, an external merge at the default work_mem, which made it ~2x the day-only
# GROUP BY and so an unfairly slow baseline.)
BOTH_PERIODS_GROUP_BY = """
CREATE TEMP TABLE plain_result AS
WITH days AS (
    SELECT org_id, event_type, date_trunc('day', occurred_at) AS period_start,
           sum(quantity) AS value, count(*) AS events
    FROM usage_events {where}
    GROUP BY 1, 2, 3
)
SELECT org_id, event_type, 'day' AS period, period_start, value, events FROM days
UNION ALL
SELECT org_id, event_type, 'month', date_trunc('month', period_start), sum(value), sum(events)
FROM days GROUP BY 1, 2, 4
"""


async def prepare_orgs(conn: asyncpg.Connection, months: int) -> None:
    """Partitions for the last `months` months and the ORGS organizations GENERATE uses,
    on all four plans and in the five ZONES."""
    await conn.execute(
        "SELECT ensure_usage_event_partitions((now() - $1 * interval '1 month')::date, "
        "now()::date)",
        months,
    )
    await conn.execute(
        "INSERT INTO org_subscriptions (org_id, plan, timezone) "
        "SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, "
        "(ARRAY['free','pro','business','enterprise'])[1 + g % 4], ($2::text[])[1 + g % 5] "
        "FROM generate_series(0, $1 - 1) g",
        ORGS,
        ZONES,
    )


async def timed(conn: asyncpg.Connection, sql: str, *args: object) -> float:
    started = time.perf_counter()
    await conn.execute(sql, *args)
    return time.perf_counter() - started


async def main(events: int, increment: int, rounds: int, pass_rounds: int) -> None:
    settings = await fresh_environment("metering_bench_agg")
    dsn = settings.database_url.get_secret_value()
    print(f"machine: {machine()}", flush=True)
    conn = await asyncpg.connect(dsn, command_timeout=3600)
    await prepare_orgs(conn, months=3)
    started = time.perf_counter()
    step = 1_000_000
    for first in range(0, events, step):
        await conn.execute(GENERATE, first, min(first + step, events) - 1, "base", SIXTY_DAYS)
        print(f"  generated {min(first + step, events):,} events", flush=True)
    await conn.execute("VACUUM ANALYZE usage_events")
    print(f"generated {events:,} events in {time.perf_counter() - started:.0f}s", flush=True)
    # Everything generated so far is below the watermark: the full re-aggregation covers it.
    await conn.execute(
        "UPDATE aggregator_state SET watermark_xid = "
        "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
    )
    span = await conn.fetchrow(
        "SELECT min(occurred_at) - interval '1 day' AS a, "
        "max(occurred_at) + interval '1 day' AS b FROM usage_events"
    )

    print("\n== full re-aggregation of all events vs plain GROUP BY (same rows)", flush=True)
    for period in ("day", "month"):
        ours, plain, tuned = [], [], []
        for _ in range(rounds):
            plain.append(await timed(conn, PLAIN_GROUP_BY.format(period=period, where="")))
            await conn.execute("DROP TABLE plain_result")
            # The same GROUP BY with aggregate_usage's own settings, so that the ratio is
            # not the settings' doing.
            async with conn.transaction():
                await conn.execute(TUNED)
                tuned.append(await timed(conn, PLAIN_GROUP_BY.format(period=period, where="")))
                await conn.execute("DROP TABLE plain_result")
            async with conn.transaction():
                ours.append(
                    await timed(
                        conn, "SELECT aggregate_usage($1, $2, $3)", period, span["a"], span["b"]
                    )
                )
        rows = await conn.fetchval(
            "SELECT count(*) FROM usage_aggregations WHERE period = $1", period
        )
        mine = statistics.median(ours)
        print(
            f"{period:5}: aggregate_usage median {mine:.2f}s  "
            f"plain GROUP BY median {statistics.median(plain):.2f}s "
            f"(ratio {mine / statistics.median(plain):.2f}), with aggregate_usage's settings "
            f"{statistics.median(tuned):.2f}s (ratio {mine / statistics.median(tuned):.2f})  "
            f"({rows:,} rows; runs ours {[round(x, 2) for x in ours]}, "
            f"plain {[round(x, 2) for x in plain]}, tuned {[round(x, 2) for x in tuned]})",
            flush=True,
        )

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    store = AggregateStore(pool)
    generated = events
    # Warm-up: the pool's connection prepares its statements and compiles the functions.
    await conn.execute(GENERATE, generated, generated + 999, "warmup", 600)
    generated += 1000
    await store.run_pass(decide_crossings)
    for shape, spread in INCREMENT_SPREADS.items():
        print(
            f"\n== incremental pass over {increment:,} new events ({shape}) on top of "
            f"{generated:,}",
            flush=True,
        )
        ours, plain, both = [], [], []
        for round_number in range(pass_rounds):
            watermark = await conn.fetchval("SELECT watermark_xid FROM aggregator_state")
            await conn.execute(
                GENERATE, generated, generated + increment - 1, f"{shape}{round_number}", spread
            )
            generated += increment
            await conn.execute("ANALYZE usage_events")
            where = f"WHERE ingest_xid >= {int(watermark)}"
            plain.append(await timed(conn, PLAIN_GROUP_BY.format(period="day", where=where)))
            await conn.execute("DROP TABLE plain_result")
            started = time.perf_counter()
            result = await store.run_pass(decide_crossings)
            ours.append(time.perf_counter() - started)
            assert result.events == increment, result.events
            # after the pass, so that the pass follows the same statement as in every
            # series before this baseline was added
            both.append(await timed(conn, BOTH_PERIODS_GROUP_BY.format(where=where)))
            await conn.execute("DROP TABLE plain_result")
        mine = statistics.median(ours)
        per_round = statistics.median(a / b for a, b in zip(ours, plain, strict=True))
        print(
            f"{shape}: pass median {mine:.3f}s  plain GROUP BY median "
            f"{statistics.median(plain):.3f}s  ratio {mine / statistics.median(plain):.2f} "
            f"(median of the rounds' ratios {per_round:.2f}); "
            f"GROUP BY of day and month rows median {statistics.median(both):.3f}s  "
            f"ratio {mine / statistics.median(both):.2f}  "
            f"(runs ours {[round(x, 3) for x in ours]}, plain {[round(x, 3) for x in plain]}, "
            f"day and month {[round(x, 3) for x in both]})",
            flush=True,
        )
    await pool.close()
    await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--increment", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--pass-rounds", type=int, help="rounds of each incremental pass (default: --rounds)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.events, args.increment, args.rounds, args.pass_rounds or args.rounds))
