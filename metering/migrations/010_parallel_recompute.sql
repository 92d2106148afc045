-- The recompute's grouping runs in parallel, as a plain GROUP BY of the same rows does.
--
-- aggregate_usage (007) joined the events with a temporary table of each organization's
-- period bounds. Parallel workers cannot read temporary tables, so its one scan of the
-- window's events ran on one process while the plain GROUP BY it is measured against
-- (bench.aggregate) ran on a leader and two workers. The bounds now go into
-- aggregation_windows, an ordinary table: the workers see the rows the leader wrote in the
-- same transaction, and the grouping gets a parallel plan. Only one recompute or pass runs
-- at a time (each takes the aggregator's lock, FOR UPDATE on aggregator_state, before it
-- touches this table), so one shared table, emptied at the start, is enough; a recompute
-- that fails rolls its rows back with everything else.
--
-- enable_sort = off: the planner estimates the groups of (org, type, period, user) from the
-- events' timestamps (millions, where there are thousands) and would sort every event to
-- group them; a hash aggregation of the same rows is measured 1.3x faster. Same signature,
-- same promise as 003 and 007; what is measured is in BENCHMARKS.md.

CREATE TABLE aggregation_windows (
    org_id       uuid PRIMARY KEY,
    first_start  date NOT NULL,
    last_start   date NOT NULL,
    bounds       timestamptz[] NOT NULL,
    first_at     timestamptz NOT NULL,
    end_at       timestamptz NOT NULL
);

CREATE OR REPLACE FUNCTION aggregate_usage(p_period text, p_from timestamptz, p_to timestamptz,
                                           p_org_id uuid DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET enable_nestloop = off
SET enable_sort = off
SET jit = off
-- Measured: 256MB made the planner size its hash tables for the (over-)estimated number
-- of groups up front and every grouping 1.5-2x slower than with 64MB.
SET work_mem = '64MB'
AS $$
DECLARE
    watermark    bigint;
    written      bigint;
    unit         interval;
    gauge_types  text[];
    user_types   text[];
BEGIN
    IF p_period NOT IN ('day', 'month') THEN
        RAISE EXCEPTION 'period must be day or month, not %', p_period
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_to <= p_from THEN
        RAISE EXCEPTION 'to (%) must be after from (%)', p_to, p_from
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    unit := ('1 ' || p_period)::interval;
    SELECT coalesce(array_agg(event_type) FILTER (WHERE aggregation = 'gauge_latest'), '{}'),
           coalesce(array_agg(event_type) FILTER (WHERE aggregation = 'distinct_users'), '{}')
    INTO gauge_types, user_types
    FROM event_types;
    SELECT watermark_xid INTO watermark FROM aggregator_state WHERE name = 'usage' FOR UPDATE;

    -- Each organization's periods overlapping the window, in its zone, as the instants
    -- they start at plus the instant the last one ends: bounds[k] <= t < bounds[k + 1]
    -- means t lies in period k, whose first day is first_start + (k - 1) periods.
    -- Daylight-saving changes are in the bounds (a 23- or 25-hour day is just a shorter
    -- or longer bucket), computed once per organization and period, not once per event.
    DELETE FROM aggregation_windows;
    INSERT INTO aggregation_windows (org_id, first_start, last_start, bounds, first_at, end_at)
    SELECT w.org_id, w.first_start, w.last_start, b.bounds,
           b.bounds[1] AS first_at, b.bounds[array_length(b.bounds, 1)] AS end_at
    FROM (
        SELECT s.org_id, s.timezone,
               date_trunc(p_period, p_from AT TIME ZONE s.timezone)::date AS first_start,
               date_trunc(p_period, (p_to AT TIME ZONE s.timezone) - interval '1 microsecond')::date
                   AS last_start
        FROM org_subscriptions s
        WHERE p_org_id IS NULL OR s.org_id = p_org_id
    ) w
    CROSS JOIN LATERAL (
        SELECT array_agg(start AT TIME ZONE w.timezone ORDER BY start) AS bounds
        FROM generate_series(w.first_start::timestamp, (w.last_start + unit)::timestamp, unit)
             AS start
    ) b;
    ANALYZE aggregation_windows;

    -- One read of the window's events, grouped by period and, for distinct-user meters,
    -- by user: sums, latest gauge readings, event counts and distinct users all come from
    -- these groups. Then only what differs is written: rows whose numbers changed are
    -- updated, missing ones inserted, rows (and users) with no events left deleted. A
    -- recompute that finds everything right (the usual case) writes nothing.
    CREATE TEMP TABLE _periods ON COMMIT DROP AS
    WITH grouped AS (
        SELECT e.org_id, e.event_type, width_bucket(e.occurred_at, w.bounds) AS bucket,
               CASE WHEN e.event_type = ANY (user_types) THEN e.user_id END AS user_id,
               count(*) AS events,
               sum(e.quantity) AS total,
               max(ARRAY[extract(epoch FROM e.occurred_at), e.quantity])
                   FILTER (WHERE e.event_type = ANY (gauge_types)) AS reading,
               max(e.occurred_at) FILTER (WHERE e.event_type = ANY (gauge_types)) AS gauge_at
        FROM usage_events e
        JOIN aggregation_windows w ON w.org_id = e.org_id
        WHERE e.occurred_at >= w.first_at AND e.occurred_at < w.end_at
          AND e.ingest_xid < watermark
        GROUP BY 1, 2, 3, 4
    )
    SELECT g.org_id, g.event_type, (w.first_start + (g.bucket - 1) * unit)::date AS period_start,
           g.user_id, g.events, g.total, g.reading, g.gauge_at
    FROM grouped g
    JOIN aggregation_windows w ON w.org_id = g.org_id;

    CREATE TEMP TABLE _fresh ON COMMIT DROP AS
    SELECT org_id, event_type, period_start,
           CASE WHEN event_type = ANY (user_types) THEN count(user_id)
                WHEN event_type = ANY (gauge_types) THEN (max(reading))[2]
                ELSE sum(total)
           END AS value,
           sum(events)::bigint AS event_count,
           max(gauge_at) AS gauge_at
    FROM _periods
    GROUP BY org_id, event_type, period_start;
    GET DIAGNOSTICS written = ROW_COUNT;
    ANALYZE _fresh;

    UPDATE usage_aggregations a
    SET value = f.value, event_count = f.event_count, gauge_at = f.gauge_at, updated_at = now()
    FROM _fresh f
    WHERE a.org_id = f.org_id AND a.event_type = f.event_type AND a.period = p_period
      AND a.period_start = f.period_start
      AND (a.value, a.event_count, a.gauge_at)
          IS DISTINCT FROM (f.value, f.event_count, f.gauge_at);
    INSERT INTO usage_aggregations
        (org_id, event_type, period, period_start, value, event_count, gauge_at)
    SELECT f.org_id, f.event_type, p_period, f.period_start, f.value, f.event_count, f.gauge_at
    FROM _fresh f
    WHERE NOT EXISTS (
        SELECT FROM usage_aggregations a
        WHERE a.org_id = f.org_id AND a.event_type = f.event_type AND a.period = p_period
          AND a.period_start = f.period_start);
    DELETE FROM usage_aggregations a USING aggregation_windows w
    WHERE a.org_id = w.org_id AND a.period = p_period
      AND a.period_start BETWEEN w.first_start AND w.last_start
      AND NOT EXISTS (
          SELECT FROM _fresh f
          WHERE f.org_id = a.org_id AND f.event_type = a.event_type
            AND f.period_start = a.period_start);

    INSERT INTO usage_period_users (org_id, event_type, period, period_start, user_id)
    SELECT org_id, event_type, p_period, period_start, user_id
    FROM _periods WHERE user_id IS NOT NULL
    ON CONFLICT DO NOTHING;
    DELETE FROM usage_period_users u USING aggregation_windows w
    WHERE u.org_id = w.org_id AND u.period = p_period
      AND u.period_start BETWEEN w.first_start AND w.last_start
      AND NOT EXISTS (
          SELECT FROM _periods p
          WHERE p.org_id = u.org_id AND p.event_type = u.event_type
            AND p.period_start = u.period_start AND p.user_id = u.user_id);
    DELETE FROM aggregation_windows;
    DROP TABLE _periods, _fresh;
    RETURN written;
END;
$$;
