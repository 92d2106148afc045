-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Aggregation: how usage_events become usage_aggregations (day and month rows per org and
-- event type, in the org's time zone), incrementally (the pass) and from scratch (the
-- recompute). See README "Aggregation" for the watermark and exactly-once argument.

-- The incremental pass's work: aggregates the events of transactions in [from_xid, to_xid),
-- upserts day and month rows and distinct users, returns what the limit check needs.
CREATE OR REPLACE FUNCTION public.aggregate_new_events(p_from_xid bigint, p_to_xid bigint, OUT events bigint, OUT measured_at timestamp with time zone, OUT received_at timestamp with time zone[], OUT received_events bigint[], OUT touched_orgs uuid[], OUT touched_types text[], OUT touched_months date[], OUT touched_values numeric[])
 RETURNS record
 LANGUAGE plpgsql
 SET enable_nestloop TO 'off'
 SET jit TO 'off'
 SET work_mem TO '16MB'
 SET enable_sort TO 'off'
AS $function$
#variable_conflict use_column
DECLARE
    gauge_types  text[];
    user_types   text[];
    v1_types     text[];
BEGIN
    -- the seeded meters' types (event_types); other meters are counted by the meter pass
    SELECT coalesce(array_agg(event_type) FILTER (WHERE aggregation = 'gauge_latest'), '{}'),
           coalesce(array_agg(event_type) FILTER (WHERE aggregation = 'distinct_users'), '{}'),
           array_agg(event_type)
    INTO gauge_types, user_types, v1_types
    FROM event_types;

    WITH located AS MATERIALIZED (
        -- the new events grouped per quarter hour, each group with its org's zone and the
        -- local days of the quarter's first and last instants
        SELECT q.org_id, q.event_type, q.quarter, q.user_id, q.events, q.total, q.reading,
               coalesce(s.timezone, 'UTC') AS zone,
               (q.quarter AT TIME ZONE coalesce(s.timezone, 'UTC'))::date AS day,
               ((q.quarter + interval '14 minutes 59.999999 seconds')
                   AT TIME ZONE coalesce(s.timezone, 'UTC'))::date AS last_day
        FROM (
            SELECT e.org_id, e.event_type,
                   date_bin('15 minutes', e.occurred_at, TIMESTAMPTZ '2000-01-01 00:00+00')
                       AS quarter,
                   CASE WHEN e.user_id IS NOT NULL AND e.event_type = ANY (user_types)
                        THEN e.user_id END AS user_id,
                   count(*) AS events,
                   sum(e.quantity) AS total,
                   max(ARRAY[extract(epoch FROM e.occurred_at), e.quantity])
                       FILTER (WHERE e.event_type = ANY (gauge_types)) AS reading
            FROM usage_events e
            WHERE e.ingest_xid >= p_from_xid AND e.ingest_xid < p_to_xid
              AND e.event_type = ANY (v1_types)
              -- cancelled in this range: never counted (cancelled later: counted, then
              -- recounted by the pass that reads the cancellation)
              AND (e.cancel_xid IS NULL OR e.cancel_xid >= p_to_xid)
            GROUP BY 1, 2, 3, 4
        ) q
        LEFT JOIN org_subscriptions s ON s.org_id = q.org_id
    ), split AS (
        -- quarter hours that hold a local midnight: their events, located one by one
        SELECT l.org_id, l.event_type, l.user_id, x.day, x.events, x.total, x.reading
        FROM located l
        CROSS JOIN LATERAL (
            SELECT (e.occurred_at AT TIME ZONE l.zone)::date AS day, count(*) AS events,
                   sum(e.quantity) AS total,
                   max(ARRAY[extract(epoch FROM e.occurred_at), e.quantity])
                       FILTER (WHERE e.event_type = ANY (gauge_types)) AS reading
            FROM usage_events e
            WHERE e.org_id = l.org_id AND e.event_type = l.event_type
              AND e.occurred_at >= l.quarter AND e.occurred_at < l.quarter + interval '15 minutes'
              AND e.ingest_xid >= p_from_xid AND e.ingest_xid < p_to_xid
              AND (e.cancel_xid IS NULL OR e.cancel_xid >= p_to_xid)
              AND (CASE WHEN e.event_type = ANY (user_types) THEN e.user_id END)
                  IS NOT DISTINCT FROM l.user_id
            GROUP BY 1
        ) x
        WHERE l.day <> l.last_day
    ), days AS MATERIALIZED (
        SELECT org_id, event_type, day, sum(events) AS events, sum(total) AS total,
               max(reading) AS reading
        FROM (
            SELECT org_id, event_type, day, events, total, reading FROM located
            WHERE day = last_day AND NOT (event_type = ANY (user_types))
            UNION ALL
            SELECT org_id, event_type, day, events, total, reading FROM split
            WHERE NOT (event_type = ANY (user_types))
        ) d
        GROUP BY org_id, event_type, day
    ), rows AS (
        SELECT org_id, event_type, 'day' AS period, day AS period_start, events, total, reading
        FROM days
        UNION ALL
        SELECT org_id, event_type, 'month', date_trunc('month', day)::date, sum(events),
               sum(total), max(reading)
        FROM days GROUP BY org_id, event_type, date_trunc('month', day)::date
    ), counted AS (
        INSERT INTO usage_aggregations AS u
            (org_id, event_type, period, period_start, value, event_count, gauge_at)
        SELECT org_id, event_type, period, period_start,
               CASE WHEN event_type = ANY (gauge_types) THEN reading[2] ELSE total END, events,
               CASE WHEN event_type = ANY (gauge_types) THEN to_timestamp(reading[1]) END
        FROM rows
        ORDER BY org_id, event_type, period, period_start
        ON CONFLICT (org_id, event_type, period, period_start) DO UPDATE
        -- gauges (gauge_at set): keep the latest reading, on equal times the larger one
        SET value = CASE
                        WHEN excluded.gauge_at IS NULL THEN u.value + excluded.value
                        WHEN (excluded.gauge_at, excluded.value) > (u.gauge_at, u.value) THEN excluded.value
                        ELSE u.value
                    END,
            gauge_at = greatest(u.gauge_at, excluded.gauge_at),
            event_count = u.event_count + excluded.event_count,
            updated_at = now()
        RETURNING u.org_id, u.event_type, u.period, u.period_start, u.value
    ), seen AS (
        SELECT org_id, event_type, day, user_id, events FROM located
        WHERE day = last_day AND event_type = ANY (user_types)
        UNION ALL
        SELECT org_id, event_type, day, user_id, events FROM split
        WHERE event_type = ANY (user_types)
    ), user_periods AS (
        SELECT DISTINCT org_id, event_type, 'day' AS period, day AS period_start, user_id
        FROM seen WHERE user_id IS NOT NULL
        UNION
        SELECT DISTINCT org_id, event_type, 'month', date_trunc('month', day)::date, user_id
        FROM seen WHERE user_id IS NOT NULL
    ), new_users AS (
        INSERT INTO usage_period_users (org_id, event_type, period, period_start, user_id)
        SELECT * FROM user_periods ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT DO NOTHING
        RETURNING usage_period_users.org_id, usage_period_users.event_type,
                  usage_period_users.period, usage_period_users.period_start
    ), added AS (
        SELECT n.org_id, n.event_type, n.period, n.period_start, count(*) AS users
        FROM new_users n GROUP BY 1, 2, 3, 4
    ), user_events AS (
        SELECT org_id, event_type, 'day' AS period, day AS period_start, sum(events) AS events
        FROM seen GROUP BY 1, 2, 4
        UNION ALL
        SELECT org_id, event_type, 'month', date_trunc('month', day)::date, sum(events)
        FROM seen GROUP BY 1, 2, 4
    ), user_rows AS (
        INSERT INTO usage_aggregations AS u (org_id, event_type, period, period_start, value, event_count)
        SELECT c.org_id, c.event_type, c.period, c.period_start, coalesce(a.users, 0), c.events
        FROM user_events c LEFT JOIN added a USING (org_id, event_type, period, period_start)
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (org_id, event_type, period, period_start) DO UPDATE
        SET value = u.value + excluded.value,
            event_count = u.event_count + excluded.event_count,
            updated_at = now()
        RETURNING u.org_id, u.event_type, u.period, u.period_start, u.value
    ), received AS (
        -- the consumer's batches of this range (and any older leftover), consumed here
        DELETE FROM ingest_batches b WHERE b.ingest_xid < p_to_xid
        RETURNING b.received_at, b.events::bigint AS events
    ), touched AS (
        -- every month row the pass wrote, with its value after the pass
        SELECT org_id, event_type, period_start AS month, value FROM counted
        WHERE period = 'month'
        UNION ALL
        SELECT org_id, event_type, period_start, value FROM user_rows WHERE period = 'month'
    )
    SELECT (SELECT coalesce(sum(l.events), 0) FROM located l)::bigint, clock_timestamp(),
           rc.at, rc.events, tc.orgs, tc.types, tc.months, tc.month_values
    INTO events, measured_at, received_at, received_events,
         touched_orgs, touched_types, touched_months, touched_values
    FROM (SELECT count(*) FROM counted) AS c, (SELECT count(*) FROM user_rows) AS r,
         (SELECT coalesce(array_agg(received.received_at), '{}') AS at,
                 coalesce(array_agg(received.events), '{}') AS events FROM received) AS rc,
         (SELECT coalesce(array_agg(org_id), '{}') AS orgs,
                 coalesce(array_agg(event_type), '{}') AS types,
                 coalesce(array_agg(month), '{}') AS months,
                 coalesce(array_agg(value), '{}') AS month_values FROM touched) AS tc;
END;
$function$;

-- One pass in one call: aggregate_new_events, the recount of the periods of the events
-- cancelled in the same range, then the crossings of the touched limits.
CREATE OR REPLACE FUNCTION public.aggregation_pass(p_from_xid bigint, p_to_xid bigint, OUT events bigint, OUT measured_at timestamp with time zone, OUT received_at timestamp with time zone[], OUT received_events bigint[], OUT limit_orgs uuid[], OUT limit_features text[], OUT limit_periods text[], OUT limit_starts date[], OUT limit_used numeric[], OUT limit_values bigint[], OUT limit_thresholds integer[], OUT limit_notified integer[])
 RETURNS record
 LANGUAGE plpgsql
AS $function$
DECLARE
    applied         record;
    touched_orgs    uuid[];
    touched_types   text[];
    touched_months  date[];
    touched_values  numeric[];
BEGIN
    SELECT * INTO applied FROM aggregate_new_events(p_from_xid, p_to_xid);
    events := applied.events;
    touched_orgs := applied.touched_orgs;
    touched_types := applied.touched_types;
    touched_months := applied.touched_months;
    touched_values := applied.touched_values;
    IF recount_cancelled_periods(p_from_xid, p_to_xid) > 0 THEN
        -- the months the new events touched, as they stand after the recount
        SELECT coalesce(array_agg(coalesce(a.value, 0) ORDER BY t.n), '{}')
        INTO touched_values
        FROM unnest(touched_orgs, touched_types, touched_months) WITH ORDINALITY
                 AS t (org_id, event_type, month, n)
        LEFT JOIN usage_aggregations a
               ON a.org_id = t.org_id AND a.event_type = t.event_type
              AND a.period = 'month' AND a.period_start = t.month;
    END IF;
    -- limits whose definition changed (an override, a plan): checked in their current
    -- month whatever the events did (a NULL value: usage_for_limit reads it)
    WITH due AS (
        DELETE FROM limit_rechecks RETURNING org_id, feature_key
    )
    SELECT touched_orgs || coalesce(array_agg(d.org_id), '{}'),
           touched_types || coalesce(array_agg(m.key), '{}'),
           touched_months || coalesce(array_agg(
               date_trunc('month', now() AT TIME ZONE coalesce(s.timezone, 'UTC'))::date), '{}'),
           touched_values || coalesce(array_agg(NULL::numeric), '{}')
    INTO touched_orgs, touched_types, touched_months, touched_values
    FROM due d
    JOIN meters m ON m.limit_key = d.feature_key AND m.status <> 'archived'
    LEFT JOIN org_subscriptions s ON s.org_id = d.org_id;
    measured_at := applied.measured_at;
    received_at := applied.received_at;
    received_events := applied.received_events;
    SELECT coalesce(array_agg(u.org_id), '{}'), coalesce(array_agg(u.feature_key), '{}'),
           coalesce(array_agg(u.period), '{}'), coalesce(array_agg(u.period_start), '{}'),
           coalesce(array_agg(u.used), '{}'), coalesce(array_agg(u.limit_value), '{}'),
           coalesce(array_agg(padded_thresholds(u.thresholds)), '{}'),
           coalesce(array_agg(u.notified), '{}')
    INTO limit_orgs, limit_features, limit_periods, limit_starts, limit_used, limit_values,
         limit_thresholds, limit_notified
    FROM touched_limit_usage(touched_orgs, touched_types, touched_months, touched_values) AS u;
END;
$function$;

-- A limit's thresholds as a row of a two-dimensional array (aggregation_pass, meter_pass
-- hand every touched limit's over in one): padded with NULLs to the most a limit has (10).
CREATE OR REPLACE FUNCTION public.padded_thresholds(p_thresholds integer[])
 RETURNS integer[]
 LANGUAGE sql
 IMMUTABLE
AS $function$
    SELECT p_thresholds || array_fill(NULL::integer, ARRAY[10 - cardinality(p_thresholds)])
$function$;

-- The cancellations of the transactions in [from_xid, to_xid) (contract section 10): the
-- day and the month each cancelled event of a seeded type was in, in its org's zone, are
-- recomputed by aggregate_usage at the watermark to_xid (moved here; the pass's FINISH_PASS
-- moves it to the same place), which leaves out every event cancelled below it. Returns
-- how many cancelled events it read.
CREATE OR REPLACE FUNCTION public.recount_cancelled_periods(p_from_xid bigint, p_to_xid bigint)
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
DECLARE
    w          record;
    cancelled  bigint;
BEGIN
    SELECT count(*) INTO cancelled
    FROM usage_events e
    WHERE e.cancel_xid >= p_from_xid AND e.cancel_xid < p_to_xid
      AND e.event_type IN (SELECT event_type FROM event_types);
    IF cancelled = 0 THEN
        RETURN 0;
    END IF;
    UPDATE aggregator_state SET watermark_xid = p_to_xid WHERE name = 'usage';
    FOR w IN
        SELECT DISTINCT e.org_id, p.period,
               date_trunc(p.period, e.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))
                   AT TIME ZONE coalesce(s.timezone, 'UTC') AS start_at,
               (date_trunc(p.period, e.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))
                   + ('1 ' || p.period)::interval) AT TIME ZONE coalesce(s.timezone, 'UTC')
                   AS end_at
        FROM usage_events e
        LEFT JOIN org_subscriptions s ON s.org_id = e.org_id
        CROSS JOIN (VALUES ('day'), ('month')) AS p (period)
        WHERE e.cancel_xid >= p_from_xid AND e.cancel_xid < p_to_xid
          AND e.event_type IN (SELECT event_type FROM event_types)
        ORDER BY 1, 2, 3
    LOOP
        PERFORM aggregate_usage(w.period, w.start_at, w.end_at, w.org_id);
    END LOOP;
    RETURN cancelled;
END;
$function$;

-- Recomputes a window of one period kind from raw events (`metering reaggregate`),
-- writing only rows that differ; running it twice changes nothing (contract section 4).
CREATE OR REPLACE FUNCTION public.aggregate_usage(p_period text, p_from timestamp with time zone, p_to timestamp with time zone, p_org_id uuid DEFAULT NULL::uuid)
 RETURNS bigint
 LANGUAGE plpgsql
 SET enable_nestloop TO 'off'
 SET enable_sort TO 'off'
 SET jit TO 'off'
 SET work_mem TO '64MB'
AS $function$
DECLARE
    watermark    bigint;
    written      bigint;
    unit         interval;
    gauge_types  text[];
    user_types   text[];
    v1_types     text[];
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
           coalesce(array_agg(event_type) FILTER (WHERE aggregation = 'distinct_users'), '{}'),
           array_agg(event_type)
    INTO gauge_types, user_types, v1_types
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
          AND e.ingest_xid < watermark AND e.event_type = ANY (v1_types)
          AND (e.cancel_xid IS NULL OR e.cancel_xid >= watermark)
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
$function$;

-- Trigger (migration 015): a changed time zone recomputes the org's retained history.
CREATE OR REPLACE FUNCTION public.reaggregate_org_after_zone_change()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
DECLARE
    horizon   timestamptz;
    first_at  timestamptz;
    last_at   timestamptz;
    p         text;
BEGIN
    -- the incremental passes hold these locks while they run: none runs in between
    PERFORM 1 FROM aggregator_state WHERE name IN ('usage', 'meters') ORDER BY name DESC
    FOR UPDATE;
    SELECT raw_events_from INTO horizon FROM retention_state WHERE name = 'usage_events';
    SELECT min(occurred_at), max(occurred_at) INTO first_at, last_at
    FROM usage_events
    WHERE org_id = NEW.org_id AND occurred_at >= coalesce(horizon, '-infinity');
    FOREACH p IN ARRAY ARRAY['day', 'month'] LOOP
        -- the old zone's rows after the horizon's day; aggregate_usage writes the new ones
        DELETE FROM usage_aggregations
        WHERE org_id = NEW.org_id AND period = p
          AND period_start > coalesce((horizon AT TIME ZONE OLD.timezone)::date, '-infinity'::date);
        DELETE FROM usage_period_users
        WHERE org_id = NEW.org_id AND period = p
          AND period_start > coalesce((horizon AT TIME ZONE OLD.timezone)::date, '-infinity'::date);
        IF first_at IS NOT NULL THEN
            PERFORM aggregate_usage(p, first_at, last_at + interval '1 microsecond', NEW.org_id);
        END IF;
    END LOOP;
    -- the meters that are not builtin (65_meter_pass.sql)
    PERFORM recount_meters_of_org(NEW.org_id, horizon, NEW.timezone);
    RETURN NULL;
END;
$function$;
