-- The incremental pass reads only its new events, reads nothing else per event, and checks
-- only the limits it has not notified yet. Measured with bench.aggregate (100,000 live
-- events on 10M): see BENCHMARKS.md.
--
-- 1. A btree on ingest_xid instead of the BRIN index. A BRIN index returns every page range
--    not yet summarized (summaries are made by VACUUM, which on these append-only tables
--    runs when a table has tripled, see 001) as a possible match, so each pass re-read the
--    whole unsummarized tail of the month's partition: measured on 2.6M events, 100,000
--    new events took a bitmap scan of 608,000 rows. Its cost grew with the time since the
--    last vacuum, not with the new events. A btree finds exactly the new rows (35 ms
--    instead of 77 ms for those 100,000); every event of a writing transaction has the
--    same xid, so the index is small (deduplicated) and appended at its right edge.
-- 2. aggregate_new_events groups the new events per (org, type, quarter hour of UTC, user
--    for distinct-user meters) in the scan itself, then finds the local day of each group,
--    not of each event: no join and no time-zone conversion per event and no materialized
--    copy of the events. Every UTC offset in use is a whole number of quarter hours, so a
--    local midnight never falls inside a quarter hour; should one ever do (a historical
--    local mean time, a future zone), the quarter's first and last instants fall on
--    different local days and that group's events are located one by one instead. This
--    relies on an instant's local date not going back and forth inside one quarter hour
--    (two offset changes within 15 minutes); `metering reconcile`, which converts every
--    event on its own, would list any aggregate where that ever failed.
-- 3. The storage times for the freshness histogram come from ingest_batches, one row per
--    writing transaction of the consumer (how many events, when), which the pass consumes,
--    instead of a second grouping key on every event (measured: +10% on the scan).
-- 4. touched_limit_usage: the usage of every limit the pass touched (usage_for_limit, as the
--    access check computes it), with the thresholds already recorded, so the aggregator
--    proposes only crossings that are new.

CREATE INDEX usage_events_ingest_xid_btree ON usage_events (ingest_xid);
DROP INDEX usage_events_ingest_xid;

-- One row per transaction of the consumer that stored events: when, and how many. The
-- aggregator deletes the rows of the transactions it has aggregated, so the table holds
-- only what is not aggregated yet. Events stored by other means (SQL) are aggregated all
-- the same; they are just not observed in the freshness histogram.
CREATE TABLE ingest_batches (
    ingest_xid   bigint      PRIMARY KEY DEFAULT (pg_current_xact_id()::text::bigint),
    received_at  timestamptz NOT NULL DEFAULT now(),
    events       int         NOT NULL CHECK (events > 0)
);

CREATE OR REPLACE FUNCTION aggregate_new_events(
    p_from_xid bigint, p_to_xid bigint,
    OUT events bigint, OUT measured_at timestamptz,
    OUT received_at timestamptz[], OUT received_events bigint[],
    OUT touched_orgs uuid[], OUT touched_types text[], OUT touched_months date[])
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
                   CASE WHEN e.event_type = ANY (user_types) THEN e.user_id END AS user_id,
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
        RETURNING 1
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
        RETURNING 1
    ), received AS (
        -- the consumer's batches of this range (and any older leftover), consumed here
        DELETE FROM ingest_batches b WHERE b.ingest_xid < p_to_xid
        RETURNING b.received_at, b.events::bigint AS events
    ), touched AS (
        SELECT org_id, event_type, period_start AS month FROM rows WHERE period = 'month'
        UNION ALL
        SELECT org_id, event_type, period_start FROM user_events WHERE period = 'month'
    )
    SELECT (SELECT coalesce(sum(l.events), 0) FROM located l)::bigint, clock_timestamp(),
           rc.at, rc.events, tc.orgs, tc.types, tc.months
    INTO events, measured_at, received_at, received_events,
         touched_orgs, touched_types, touched_months
    FROM (SELECT count(*) FROM counted) AS c, (SELECT count(*) FROM user_rows) AS r,
         (SELECT coalesce(array_agg(received.received_at), '{}') AS at,
                 coalesce(array_agg(received.events), '{}') AS events FROM received) AS rc,
         (SELECT coalesce(array_agg(org_id), '{}') AS orgs,
                 coalesce(array_agg(event_type), '{}') AS types,
                 coalesce(array_agg(month), '{}') AS months FROM touched) AS tc;
END;
$$;

GRANT INSERT ON ingest_batches TO metering_writer;

-- The thresholds already recorded for one limit, found without computing crossing ids.
CREATE INDEX limit_notifications_by_limit
    ON limit_notifications (org_id, feature_key, period_start);

-- For every (org, event type, month) a pass touched whose limit is not unlimited: the usage
-- of that limit as the access check computes it (usage_for_limit, the one definition of
-- "used"), the limit, and the thresholds already recorded for it. One row per limit and
-- period (a lifetime limit touched in several months is one row).
CREATE FUNCTION touched_limit_usage(p_orgs uuid[], p_types text[], p_months date[])
RETURNS TABLE (org_id uuid, feature_key text, period text, period_start date, used numeric,
               limit_value bigint, notified int[])
LANGUAGE sql STABLE AS $$
    WITH touched AS (
        SELECT DISTINCT g.org_id, t.limit_key, t.lifetime,
               CASE WHEN t.lifetime THEN NULL ELSE g.month END AS month
        FROM unnest(p_orgs, p_types, p_months) AS g (org_id, event_type, month)
        JOIN event_types t ON t.event_type = g.event_type
    )
    SELECT x.org_id, x.limit_key, CASE WHEN x.lifetime THEN 'lifetime' ELSE 'month' END, x.month,
           usage_for_limit(x.org_id, x.limit_key, x.month),
           pf.limit_value,
           coalesce((SELECT array_agg(n.threshold_percent ORDER BY n.threshold_percent)
                     FROM limit_notifications n
                     WHERE n.org_id = x.org_id AND n.feature_key = x.limit_key
                       AND n.period_start IS NOT DISTINCT FROM x.month), '{}')
    FROM touched x
    LEFT JOIN org_subscriptions s ON s.org_id = x.org_id
    JOIN plan_features pf ON pf.plan = coalesce(s.plan, 'free') AND pf.feature_key = x.limit_key
    WHERE pf.limit_value <> -1
$$;
