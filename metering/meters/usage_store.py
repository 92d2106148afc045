"""Usage of one meter by window and dimensions (`GET /v1/orgs/{org}/meters/{key}/usage`,
`metering usage ORG --meter KEY`): the SQL, run as the `metering_reader` role scoped to the
organization (row-level security), both paths of `metering.meters.windows`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from metering.meters.store import MeterNotFound
from metering.meters.windows import (
    InvalidUsageQuery,
    WindowRange,
    check_served_range,
    local_instant,
    next_window,
    window_floor,
    window_range,
    zone_of,
)
from metering.storage.reads import as_reader_of_org

# the reader role, scoped to one organization, for this transaction (one round trip)
AS_READER_OF_ORG = (
    "SELECT set_config('role', 'metering_reader', true), set_config('metering.org_id', $1, true)"
)
# the raw path's statement has `$org IS NULL OR ...` inside the inlined readings function
FORCE_CUSTOM_PLAN = "SET LOCAL plan_cache_mode = force_custom_plan"
# the meter and the organization's zone
METER = """
SELECT key, aggregation, group_by, builtin, status,
       coalesce((SELECT timezone FROM org_subscriptions WHERE org_id = $2), 'UTC') AS org_zone
FROM meters WHERE key = $1
"""
WATERMARK = "SELECT watermark_xid FROM aggregator_state WHERE name = 'meters'"
# The occurred_at of the organization's event after the first $4 in [$2, $3): where a
# range computed from raw events has to stop (NULL: the range holds at most $4)
RAW_EVENTS_CUT = """
SELECT occurred_at FROM usage_events
WHERE org_id = $1 AND occurred_at >= $2 AND occurred_at < $3
ORDER BY occurred_at OFFSET $4 LIMIT 1
"""
MAX_RAW_EVENTS = 50_000
# $1 org, $2 meter, $3 window, $4 zone, $5 kept dimensions, $6/$7 instants, $8 filter,
# $9 watermark. The dimensions kept are the query's group_by; the others are merged.
FROM_EVENTS = """
SELECT window_start, dims::text AS dimensions,
       CASE min(aggregation)
           WHEN 'max' THEN max(number)
           WHEN 'latest' THEN (array_agg(number ORDER BY occurred_at DESC, number DESC))[1]
           WHEN 'unique_count' THEN count(DISTINCT unique_value)
           ELSE sum(number)
       END AS value,
       count(*) AS event_count
FROM (
    -- days and months from local midnight; an hour from the local hour at the event's own
    -- offset (the hour repeated when summer time ends is two windows)
    SELECT CASE $3::text
               WHEN 'hour' THEN r.occurred_at - ((r.occurred_at AT TIME ZONE $4)
                                 - date_trunc('hour', r.occurred_at AT TIME ZONE $4))
               ELSE date_trunc($3, r.occurred_at AT TIME ZONE $4) AT TIME ZONE $4
           END AS window_start,
           (SELECT coalesce(jsonb_object_agg(k, r.dimensions -> k), '{}'::jsonb)
            FROM unnest($5::text[]) AS k) AS dims,
           r.aggregation, r.number, r.unique_value, r.occurred_at
    FROM meter_event_readings(ARRAY[$2::text], $1::uuid, 0, $9::bigint, $6, $7) r
    WHERE r.skipped IS NULL AND r.dimensions @> $8::jsonb
) x
GROUP BY window_start, dims
"""
# $1 org, $2 meter, $3 period, $4/$5 dates, $6 kept dimensions, $7 aggregation, $8 filter
FROM_ROLLUPS = """
SELECT period_start::timestamp AS local_start, dims::text AS dimensions,
       CASE $7::text
           WHEN 'max' THEN max(value)
           WHEN 'latest' THEN (array_agg(value ORDER BY latest_at DESC, value DESC))[1]
           ELSE sum(value)
       END AS value,
       sum(event_count)::bigint AS event_count
FROM (
    SELECT period_start, value, event_count, latest_at,
           (SELECT coalesce(jsonb_object_agg(k, a.dimensions -> k), '{}'::jsonb)
            FROM unnest($6::text[]) AS k) AS dims
    FROM meter_aggregations a
    WHERE org_id = $1 AND meter_key = $2 AND period = $3
      AND period_start >= $4 AND period_start < $5 AND dimensions @> $8::jsonb
) x
GROUP BY period_start, dims
"""
# unique_count with some dimensions merged: distinct values again, not a sum of counts
UNIQUE_FROM_ROLLUPS = """
SELECT period_start::timestamp AS local_start, dims::text AS dimensions,
       count(DISTINCT value) AS value
FROM (
    SELECT period_start, value,
           (SELECT coalesce(jsonb_object_agg(k, u.dimensions -> k), '{}'::jsonb)
            FROM unnest($6::text[]) AS k) AS dims
    FROM meter_unique_values u
    WHERE org_id = $1 AND meter_key = $2 AND period = $3
      AND period_start >= $4 AND period_start < $5 AND dimensions @> $7::jsonb
) x
GROUP BY period_start, dims
"""
# time_weighted: computed from the readings (meter_readings) for any window and zone
TIME_WEIGHTED = """
SELECT window_start, dimensions, value, event_count
FROM time_weighted_usage($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)
"""
FROM_V1_ROLLUPS = """
SELECT period_start::timestamp AS local_start, '{}' AS dimensions, value, event_count
FROM usage_aggregations
WHERE org_id = $1 AND event_type = $2 AND period = $3
  AND period_start >= $4 AND period_start < $5
"""


@dataclass(frozen=True)
class UsageRow:
    start: datetime  # the instant the window starts
    dimensions: str  # JSON text, as PostgreSQL spells it (the sort key of pages)
    value: Decimal
    event_count: int


@dataclass(frozen=True)
class UsageAnswer:
    meter: str
    status: str
    windows: WindowRange
    from_rollups: bool
    rows: list[UsageRow]

    def window_end(self, row: UsageRow) -> datetime:
        zone = self.windows.zone
        if self.windows.window == "hour":
            return row.start + timedelta(hours=1)
        local = row.start.astimezone(zone).replace(tzinfo=None)
        return local_instant(next_window(local, self.windows.window), zone)


class MeterUsageStore:
    def __init__(self, pool: asyncpg.Pool, max_raw_events: int = MAX_RAW_EVENTS) -> None:
        self._pool = pool
        self._max_raw_events = max_raw_events

    async def usage(
        self,
        org_id: UUID,
        meter_key: str,
        *,
        window: str,
        tz: str | None,
        start: str | None,
        end: str | None,
        group_by: list[str] | None,
        filters: dict[str, str],
        now: datetime,
    ) -> UsageAnswer:
        """Every row of the query (unpaged), sorted by window start then dimensions.
        Raises MeterNotFound, or InvalidUsageQuery naming the parameter at fault."""
        async with as_reader_of_org(self._pool, org_id) as conn:
            return await self._usage_on(
                conn,
                org_id,
                meter_key,
                window=window,
                tz=tz,
                start=start,
                end=end,
                group_by=group_by,
                filters=filters,
                now=now,
            )

    async def day_usage_many(
        self,
        org_id: UUID,
        queries: list[tuple[str, list[str]]],
        start: str,
        end: str,
        now: datetime,
    ) -> list[UsageAnswer]:
        """`usage` with day windows in the organization's zone over [start, end) for each
        (meter, group_by) of `queries`, in one transaction (one snapshot, one round trip
        less per query): the usage page's reads."""
        async with as_reader_of_org(self._pool, org_id) as conn:
            return [
                await self._usage_on(
                    conn,
                    org_id,
                    meter_key,
                    window="day",
                    tz=None,
                    start=start,
                    end=end,
                    group_by=group_by,
                    filters={},
                    now=now,
                )
                for meter_key, group_by in queries
            ]

    async def _usage_on(
        self,
        conn: Any,
        org_id: UUID,
        meter_key: str,
        *,
        window: str,
        tz: str | None,
        start: str | None,
        end: str | None,
        group_by: list[str] | None,
        filters: dict[str, str],
        now: datetime,
    ) -> UsageAnswer:
        from metering.meters.windows import parse_bound

        meter = await conn.fetchrow(METER, meter_key, org_id)
        if meter is None:
            raise MeterNotFound(meter_key)
        dimensions = list(meter["group_by"])
        kept = dimensions if group_by is None else group_by
        for name in [*kept, *filters]:
            if name not in dimensions:
                raise InvalidUsageQuery(
                    "group_by" if name in kept else f"filter[{name}]",
                    f"{meter_key!r} has no dimension {name!r}"
                    + (f" (its dimensions: {', '.join(dimensions)})" if dimensions else ""),
                )
        org_zone: str = meter["org_zone"]
        zone_name = tz or org_zone
        zone = zone_of(zone_name)
        windows = window_range(
            window,
            zone,
            parse_bound(start, zone, "from") if start else None,
            parse_bound(end, zone, "to") if end else None,
            now,
        )
        from_rollups = window != "hour" and zone_name == org_zone
        check_served_range(windows, from_rollups)
        wanted = json.dumps(filters)
        if meter["aggregation"] == "time_weighted":
            rows = await conn.fetch(
                TIME_WEIGHTED,
                org_id,
                meter_key,
                window,
                zone_name,
                windows.start_instant,
                windows.end_instant,
                now,
                kept,
                wanted,
            )
        elif from_rollups:
            rows = await self._from_rollups(conn, meter, org_id, windows, kept, wanted)
        else:
            await self._refuse_too_many_events(conn, org_id, windows)
            await conn.execute(FORCE_CUSTOM_PLAN)
            watermark = await conn.fetchval(WATERMARK)
            rows = await conn.fetch(
                FROM_EVENTS,
                org_id,
                meter_key,
                window,
                zone_name,
                kept,
                windows.start_instant,
                windows.end_instant,
                wanted,
                watermark,
            )
        starts: dict[datetime, datetime] = {}  # local start -> instant, once per window
        found = []
        for r in rows:
            began: datetime | None = r.get("window_start")
            if began is None:
                local = r["local_start"]
                began = starts.get(local) or starts.setdefault(
                    local, local_instant(local, windows.zone)
                )
            found.append(UsageRow(began, r["dimensions"], Decimal(r["value"]), r["event_count"]))
        found.sort(key=lambda row: (row.start, row.dimensions))
        return UsageAnswer(meter_key, meter["status"], windows, from_rollups, found)

    async def _refuse_too_many_events(self, conn: Any, org_id: UUID, windows: WindowRange) -> None:
        """The raw path's cost grows with the events it reads (~5 us each): refuse a range
        holding more than `max_raw_events` of the organization's, naming the largest `to`."""
        most = self._max_raw_events
        cut = await conn.fetchval(
            RAW_EVENTS_CUT, org_id, windows.start_instant, windows.end_instant, most
        )
        if cut is None:
            return
        # windows are whole: the largest `to` is the start of the window holding the cut
        largest = local_instant(window_floor(cut, windows.window, windows.zone), windows.zone)
        allowed = (
            f"the largest `to` for this `from` is {largest.isoformat()}"
            if largest > windows.start_instant
            else f"even its first {windows.window} window holds more"
        )
        raise InvalidUsageQuery(
            "to",
            f"the range holds more than {most:,} events of this organization, the most "
            "computed from raw events per request (hour windows, or a zone other than the "
            f"organization's); {allowed}; day or month windows in the organization's zone "
            "have no such bound",
        )

    async def _from_rollups(
        self,
        conn: Any,
        meter: asyncpg.Record,
        org_id: UUID,
        windows: WindowRange,
        kept: list[str],
        wanted: str,
    ) -> list[Any]:
        first, end = windows.first_date(), windows.end_date()
        if meter["builtin"]:
            return list(
                await conn.fetch(FROM_V1_ROLLUPS, org_id, meter["key"], windows.window, first, end)
            )
        args = (org_id, meter["key"], windows.window, first, end, kept)
        rows = await conn.fetch(FROM_ROLLUPS, *args, meter["aggregation"], wanted)
        if meter["aggregation"] != "unique_count" or kept == list(meter["group_by"]):
            return list(rows)
        distinct = {
            (r["local_start"], r["dimensions"]): r["value"]
            for r in await conn.fetch(UNIQUE_FROM_ROLLUPS, *args, wanted)
        }
        return [{**dict(r), "value": distinct[(r["local_start"], r["dimensions"])]} for r in rows]
