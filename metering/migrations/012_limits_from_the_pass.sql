-- The limit check of a pass reads what the pass wrote, and looks up recorded thresholds only
-- for limits that are reached.
--
-- Measured on bench.aggregate's 10M database (100,000 live events per pass, ~1,000 touched
-- months, 750 limited): the limit check was 20-40% of a pass (a pass without it: 1.41x the
-- plain GROUP BY, with it 1.83x; BENCHMARKS.md). Per touched limit it ran a plpgsql
-- usage_for_limit (two queries) and two index probes for the recorded thresholds, sorted
-- into an array. Now:
--
-- 1. aggregate_new_events also returns the value of every month row it wrote (RETURNING of
--    its upserts): for a monthly meter that value is what usage_for_limit reads (the month's
--    sum or distinct users; for a gauge the latest month row up to that month, which is this
--    row, since the pass just wrote it). Only lifetime limits still sum their months, with
--    one index range scan each. The one definition of "used" stays usage_for_limit; the
--    test test_limit_usage_of_a_pass_agrees_with_the_access_check compares the two for
--    every kind of meter.
-- 2. touched_limit_usage returns only limits that reach the lowest of the caller's
--    thresholds (the same comparison as aggregator/limits.py thresholds_reached: used * 100
--    >= limit * threshold, any use above a limit of 0), so a limit well below its threshold
--    costs no lookup of recorded thresholds. Those come back as a bit mask over the
--    thresholds (bit i: p_thresholds[i + 1] recorded), without sorting an array per limit.
-- 3. The distinct-user key compares the event type only for events that carry a user_id.
-- 4. A limit key belongs to one event type (usage_for_limit already read one row), now a
--    unique index.

CREATE UNIQUE INDEX event_types_limit_key ON event_types (limit_key);

DROP FUNCTION aggregation_pass(bigint, bigint, int[]);
DROP FUNCTION touched_limit_usage(uuid[], text[], date[], int[]);
DROP FUNCTION aggregate_new_events(bigint, bigint);

CREATE FUNCTION aggregate_new_events(
    p_from_xid bigint, p_to_xid bigint,
    OUT events bigint, OUT measured_at timestamptz,
    OUT received_at timestamptz[], OUT received_events bigint[],
    OUT touched_orgs uuid[], OUT touched_types text[], OUT touched_months date[],
    OUT touched_values numeric[])
LANGUAGE plpgsql
SET enable_nestloop = off
SET jit = off
SET work_mem = '64MB'
AS $$
#variable_conflict use_column
DECLARE
    gauge_types  text[];
    user_types   text[];
BEGIN
    SELECT coalesce(array_agg(event_type) FILTER (WHERE aggregation = 'gauge_latest'), '{}'),
           coalesce(array_agg(event_type) FILTER (WHERE aggregation = 'distinct_users'), '{}')
    INTO gauge_types, user_types
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
$$;
-- For every month row a pass wrote (p_values: its value after the pass) whose limit is not
-- unlimited and is reached at the lowest of p_thresholds: the usage of that limit as
-- usage_for_limit computes it, the limit, and which of p_thresholds are already recorded
-- for it (a bit mask, bit i for p_thresholds[i + 1]); limits with all of them recorded are
-- left out. One row per limit and period (a lifetime limit touched in several months is one
-- row).
CREATE FUNCTION touched_limit_usage(p_orgs uuid[], p_types text[], p_months date[],
                                    p_values numeric[], p_thresholds int[])
RETURNS TABLE (org_id uuid, feature_key text, period text, period_start date, used numeric,
               limit_value bigint, notified int)
LANGUAGE sql STABLE AS $$
    WITH touched AS (
        -- a lifetime limit once, however many of its months the pass wrote
        SELECT DISTINCT ON (g.org_id, t.limit_key, CASE WHEN t.lifetime THEN NULL ELSE g.month END)
               g.org_id, t.event_type, t.limit_key, t.lifetime, t.limit_unit,
               CASE WHEN t.lifetime THEN NULL ELSE g.month END AS month, g.value
        FROM unnest(p_orgs, p_types, p_months, p_values) AS g (org_id, event_type, month, value)
        JOIN event_types t ON t.event_type = g.event_type
    ), measured AS (
        SELECT x.org_id, x.limit_key, x.lifetime, x.month, pf.limit_value,
               CASE WHEN x.limit_unit = 1 THEN m.amount ELSE m.amount / x.limit_unit END AS used
        FROM touched x
        LEFT JOIN org_subscriptions s ON s.org_id = x.org_id
        JOIN plan_features pf ON pf.plan = coalesce(s.plan, 'free')
                             AND pf.feature_key = x.limit_key
        CROSS JOIN LATERAL (
            SELECT CASE WHEN x.lifetime
                        THEN (SELECT coalesce(sum(a.value), 0) FROM usage_aggregations a
                              WHERE a.org_id = x.org_id AND a.event_type = x.event_type
                                AND a.period = 'month')
                        ELSE x.value END AS amount
        ) m
        WHERE pf.limit_value <> -1
    ), reached AS (
        SELECT r.* FROM measured r
        WHERE CASE WHEN r.limit_value = 0 THEN r.used > 0
                   ELSE r.used * 100 >= r.limit_value * (SELECT min(t) FROM unnest(p_thresholds) t)
              END
    )
    SELECT r.org_id, r.limit_key, CASE WHEN r.lifetime THEN 'lifetime' ELSE 'month' END,
           r.month, r.used, r.limit_value, n.notified
    FROM reached r
    CROSS JOIN LATERAL (
        SELECT coalesce(bit_or(1 << (array_position(p_thresholds, q.threshold_percent) - 1)),
                        0) AS notified
        FROM (
            SELECT l.threshold_percent FROM limit_notifications l
            WHERE l.org_id = r.org_id AND l.feature_key = r.limit_key
              AND l.period_start = r.month
            UNION ALL
            SELECT l.threshold_percent FROM limit_notifications l
            WHERE r.lifetime AND l.org_id = r.org_id AND l.feature_key = r.limit_key
              AND l.period_start IS NULL
        ) q
        WHERE q.threshold_percent = ANY (p_thresholds)
    ) n
    WHERE n.notified <> (1 << cardinality(p_thresholds)) - 1
$$;

-- One incremental pass over the events of transactions [p_from_xid, p_to_xid): what
-- aggregate_new_events promises (the caller holds the aggregator's lock and moves the
-- watermark in the same transaction), plus every limit it touched that can notify, as
-- touched_limit_usage gives it (limit_notified: its bit mask over p_thresholds).
CREATE FUNCTION aggregation_pass(
    p_from_xid bigint, p_to_xid bigint, p_thresholds int[],
    OUT events bigint, OUT measured_at timestamptz,
    OUT received_at timestamptz[], OUT received_events bigint[],
    OUT limit_orgs uuid[], OUT limit_features text[], OUT limit_periods text[],
    OUT limit_starts date[], OUT limit_used numeric[], OUT limit_values bigint[],
    OUT limit_notified int[])
LANGUAGE plpgsql AS $$
DECLARE
    applied record;
BEGIN
    SELECT * INTO applied FROM aggregate_new_events(p_from_xid, p_to_xid);
    events := applied.events;
    measured_at := applied.measured_at;
    received_at := applied.received_at;
    received_events := applied.received_events;
    SELECT coalesce(array_agg(u.org_id), '{}'), coalesce(array_agg(u.feature_key), '{}'),
           coalesce(array_agg(u.period), '{}'), coalesce(array_agg(u.period_start), '{}'),
           coalesce(array_agg(u.used), '{}'), coalesce(array_agg(u.limit_value), '{}'),
           coalesce(array_agg(u.notified), '{}')
    INTO limit_orgs, limit_features, limit_periods, limit_starts, limit_used, limit_values,
         limit_notified
    FROM touched_limit_usage(applied.touched_orgs, applied.touched_types,
                             applied.touched_months, applied.touched_values,
                             p_thresholds) AS u;
END;
$$;
