"""Does a pass's limit check cost grow with the months of notification history?

    .venv/bin/python -m bench.limit_history [--months 24] [--rounds 15]

A pass checks the limits its new events touched (`touched_limit_usage`): the usage of each
(from the month rows the pass wrote), then, for those that reach a threshold, the thresholds
already recorded in that period.
`limit_notifications` keeps every crossing ever recorded, two per (org, feature, month) for
an organization that reaches its limits every month. This times the check of one pass that
touches every organization's current month, first with this month's notifications only,
then with `--months` past months of history added for every org and limited feature, on
the same rows. The answer must not change (history is of other periods), and the time
should not either.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from aggregator.limits import THRESHOLDS
from aggregator.service import decide_crossings
from aggregator.store import AggregateStore
from bench.aggregate import GENERATE, ORGS, prepare_orgs
from bench.common import fresh_environment, machine

TOUCHED_THIS_MONTH = """
SELECT array_agg(org_id), array_agg(event_type), array_agg(period_start), array_agg(value)
FROM usage_aggregations
WHERE period = 'month'
  AND period_start = (SELECT max(period_start) FROM usage_aggregations WHERE period = 'month')
"""
HISTORY = """
INSERT INTO limit_notifications
    (id, org_id, feature_key, period, period_start, threshold_percent, used, limit_value,
     crossed_at, published_at)
SELECT gen_random_uuid(), s.org_id, t.limit_key, 'month',
       (date_trunc('month', now()) - m * interval '1 month')::date, p, 1, 1, now(), now()
FROM org_subscriptions s
CROSS JOIN (SELECT DISTINCT limit_key FROM event_types WHERE NOT lifetime) t
CROSS JOIN generate_series(2, $1 + 1) AS m
CROSS JOIN unnest($2::int[]) AS p
"""
CHECK = "SELECT * FROM touched_limit_usage($1, $2, $3, $4, $5) ORDER BY 1, 2, 3, 4"


async def time_check(
    conn: asyncpg.Connection, touched: asyncpg.Record, rounds: int
) -> tuple[float, list[asyncpg.Record]]:
    times, rows = [], []
    for _ in range(rounds + 1):  # the first call plans and warms the caches: not counted
        started = time.perf_counter()
        rows = await conn.fetch(
            CHECK, touched[0], touched[1], touched[2], touched[3], list(THRESHOLDS)
        )
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), rows


async def main(months: int, rounds: int) -> None:
    settings = await fresh_environment("metering_bench_limits")
    dsn = settings.database_url.get_secret_value()
    print(f"machine: {machine()}", flush=True)
    conn = await asyncpg.connect(dsn, command_timeout=600)
    await prepare_orgs(conn, months=2)
    # 200 events per org over the last day (the organizations of bench.aggregate's GENERATE)
    await conn.execute(GENERATE, 0, 200 * ORGS - 1, "history", 86400)
    await conn.execute("ANALYZE")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    passed = await AggregateStore(pool).run_pass(decide_crossings)
    await pool.close()
    touched = await conn.fetchrow(TOUCHED_THIS_MONTH)
    assert touched is not None and touched[0]
    notified = await conn.fetchval("SELECT count(*) FROM limit_notifications")
    print(
        f"{passed.events:,} events aggregated; a pass touching {len(touched[0]):,} "
        f"(org, type, month); {notified:,} notifications recorded by it",
        flush=True,
    )
    before, rows_before = await time_check(conn, touched, rounds)
    await conn.execute(HISTORY, months, list(THRESHOLDS))
    await conn.execute("ANALYZE limit_notifications")
    history = await conn.fetchval("SELECT count(*) FROM limit_notifications")
    after, rows_after = await time_check(conn, touched, rounds)
    assert rows_after == rows_before, "history of other months changed the answer"
    print(
        f"limit check of the pass, median of {rounds}: {before * 1000:.1f} ms with "
        f"{notified:,} notifications; {after * 1000:.1f} ms with {history:,} ({months} past "
        f"months for every org and feature); ratio {after / before:.2f}; "
        f"{len(rows_after)} limits still open, same answer",
        flush=True,
    )
    await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--months", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(main(args.months, args.rounds))
