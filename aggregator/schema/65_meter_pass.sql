-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Meters that are not builtin (migration 016): how their events become meter_aggregations.
-- The seeded meters are counted by aggregate_new_events (40_aggregation.sql) as in v1.
--
-- One statement counts a set of events for a set of meters and merges the result into the
-- stored rows. Every merge is commutative and associative (sum and count add, max takes the
-- greater, latest the reading with the greater (occurred_at, value), unique_count adds the
-- values not seen before in meter_unique_values), so the incremental pass and a backfill
-- may interleave in any order: what matters is that each event is counted by exactly one of
-- them (meters.counted_from_xid draws the line). The plain-Python statement of these rules
-- is aggregator/semantics.py; the tests hold the SQL to it.

-- What meters read from stored events, one row per (event, meter): the meters `p_keys`
-- (whatever their status), the events of `p_org` (every organization when NULL) written by
-- the transactions in [p_from_xid, p_to_xid) that occurred in [p_from_at, p_to_at) (any
-- time when NULL) and whose (org_id, occurred_at) is after (p_after_org, p_after_at) and at
-- or before (p_upto_org, p_upto_at) (no bound when NULL: the backfill's chunks, read
-- through the (org_id, occurred_at) index), that pass the meter's filter and were not
-- cancelled by a transaction below `p_cancelled_before` (default `p_to_xid`: a count at a
-- watermark leaves out what was cancelled below it). `skipped` says why a meter cannot count
-- an event (NULL: it counts `number`, or `unique_value` for unique_count). The one SQL
-- statement of the reading rules (metering.meters.definition.read_event in Python): the
-- pass, the backfill and the usage queries computed from raw events all read through it.
-- A single SELECT in LANGUAGE sql, so the planner inlines it into the calling statement.
CREATE OR REPLACE FUNCTION public.meter_event_readings(p_keys text[], p_org uuid, p_from_xid bigint, p_to_xid bigint, p_from_at timestamp with time zone, p_to_at timestamp with time zone, p_after_org uuid DEFAULT NULL::uuid, p_after_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_upto_org uuid DEFAULT NULL::uuid, p_upto_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_cancelled_before bigint DEFAULT NULL::bigint)
 RETURNS TABLE(org_id uuid, meter_key text, aggregation text, occurred_at timestamp with time zone, dimensions jsonb, number numeric, unique_value text, skipped text)
 LANGUAGE sql
 STABLE
AS $function$
    SELECT r.org_id, r.key, r.aggregation, r.occurred_at, r.dimensions, r.number,
           r.unique_value,
           CASE
               WHEN r.too_long THEN 'dimension_too_long'
               WHEN r.missing IS NOT NULL THEN r.missing
               WHEN r.aggregation = 'unique_count' AND r.unique_value IS NULL
                   THEN 'value_missing'
               WHEN r.aggregation <> 'unique_count' AND r.number IS NULL THEN 'not_a_number'
           END
    FROM (
        SELECT e.org_id, m.key, m.aggregation, e.occurred_at,
               meter_dimensions(e.metadata, m.group_by) AS dimensions,
               meter_dimension_too_long(e.metadata, m.group_by) AS too_long,
               CASE m.aggregation
                   WHEN 'count' THEN 1::numeric
                   WHEN 'unique_count' THEN NULL
                   ELSE CASE WHEN m.value_path IS NULL THEN e.quantity
                             ELSE meter_number(e.metadata #> m.value_path) END
               END AS number,
               CASE WHEN m.aggregation = 'unique_count' THEN
                   CASE WHEN m.value_path IS NULL THEN e.user_id::text
                        ELSE e.metadata #>> m.value_path END
               END AS unique_value,
               CASE WHEN m.aggregation = 'count' OR m.value_path IS NULL THEN NULL
                    WHEN e.metadata #> m.value_path IS NULL
                      OR jsonb_typeof(e.metadata #> m.value_path) = 'null' THEN 'value_missing'
               END AS missing
        FROM usage_events e
        JOIN (SELECT key, event_type, aggregation, filter_docs, group_by,
                     CASE WHEN value LIKE 'metadata.%'
                          THEN string_to_array(substr(value, 10), '.') END AS value_path
              FROM meters WHERE key = ANY (p_keys)) m ON m.event_type = e.event_type
        WHERE e.ingest_xid >= p_from_xid AND e.ingest_xid < p_to_xid
          AND (e.cancel_xid IS NULL OR e.cancel_xid >= coalesce(p_cancelled_before, p_to_xid))
          AND (p_org IS NULL OR e.org_id = p_org)
          AND (p_from_at IS NULL OR e.occurred_at >= p_from_at)
          AND (p_to_at IS NULL OR e.occurred_at < p_to_at)
          -- a chunk inside one organization: org_id = and a range of occurred_at, which a
          -- btree scan stops on (with row comparisons it read to the end of the
          -- organization's entries: 0.7 s for a chunk of 1,000 events of a 10M-event org)
          AND (p_after_org IS NULL OR p_upto_org IS NULL OR p_after_org <> p_upto_org
               OR (e.org_id = p_upto_org AND e.occurred_at > p_after_at
                   AND e.occurred_at <= p_upto_at))
          -- a chunk across organizations: row comparisons, bounded by org_id
          AND (p_after_org IS NULL OR p_after_org = p_upto_org
               OR ((e.org_id, e.occurred_at) > (p_after_org, p_after_at)
                   AND e.org_id >= p_after_org))
          AND (p_upto_org IS NULL OR p_after_org = p_upto_org
               OR ((e.org_id, e.occurred_at) <= (p_upto_org, p_upto_at)
                   AND e.org_id <= p_upto_org))
          -- the filter: the metadata contains one of its documents (meters.filter_docs)
          AND (m.filter_docs IS NULL OR e.metadata @> ANY (m.filter_docs))
    ) r
$function$;

-- Counts, for the meters `p_keys` (every meter that is not builtin or archived when NULL),
-- the events written by the transactions in [p_from_xid, p_to_xid) that occurred in
-- [p_from_at, p_to_at) (any time when NULL), of `p_org` (every organization when NULL),
-- in the (org_id, occurred_at) range of meter_event_readings, into the periods
-- `p_periods`, leaving out events cancelled below `p_cancelled_before` (default
-- `p_to_xid`); returns how many (event, meter) pairs it read. Skipped
-- events are added to meter_skips (when both periods are counted).
CREATE OR REPLACE FUNCTION public.count_meter_events(p_keys text[], p_from_xid bigint, p_to_xid bigint, p_from_at timestamp with time zone, p_to_at timestamp with time zone, p_org uuid DEFAULT NULL::uuid, p_periods text[] DEFAULT '{day,month}'::text[], p_after_org uuid DEFAULT NULL::uuid, p_after_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_upto_org uuid DEFAULT NULL::uuid, p_upto_at timestamp with time zone DEFAULT NULL::timestamp with time zone, p_cancelled_before bigint DEFAULT NULL::bigint)
 RETURNS bigint
 LANGUAGE plpgsql
 SET plan_cache_mode TO 'force_custom_plan'
 SET jit TO 'off'
AS $function$
DECLARE
    counted  bigint;
    keys     text[];
BEGIN
    SELECT array_agg(m.key) INTO keys
    FROM meters m
    WHERE NOT m.builtin AND m.status <> 'archived' AND (p_keys IS NULL OR m.key = ANY (p_keys));
    IF keys IS NULL THEN
        RETURN 0;
    END IF;
    WITH judged AS MATERIALIZED (
        SELECT r.org_id, r.meter_key AS key, r.aggregation, r.occurred_at, r.dimensions,
               r.number, r.unique_value, r.skipped,
               (r.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))::date AS day
        FROM meter_event_readings(keys, p_org, p_from_xid, p_to_xid, p_from_at, p_to_at,
                                  p_after_org, p_after_at, p_upto_org, p_upto_at,
                                  p_cancelled_before) r
        LEFT JOIN org_subscriptions s ON s.org_id = r.org_id
    ), skips AS (
        INSERT INTO meter_skips AS k (meter_key, reason, events)
        SELECT key, skipped, count(*) FROM judged
        WHERE skipped IS NOT NULL AND cardinality(p_periods) = 2 GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (meter_key, reason) DO UPDATE SET events = k.events + excluded.events
        RETURNING 1
    ), readings AS (
        -- time_weighted: the readings themselves (see meter_readings, migration 016)
        INSERT INTO meter_readings AS g (org_id, meter_key, dimensions, occurred_at, value)
        SELECT org_id, key, dimensions, occurred_at, max(number) FROM judged
        WHERE aggregation = 'time_weighted' AND skipped IS NULL
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (org_id, meter_key, dimensions, occurred_at)
        DO UPDATE SET value = greatest(g.value, excluded.value)
        RETURNING 1
    ), periods AS (
        SELECT j.org_id, j.key, j.aggregation, j.dimensions, p.period,
               CASE p.period WHEN 'day' THEN j.day
                    ELSE date_trunc('month', j.day)::date END AS period_start,
               j.number, j.unique_value, j.occurred_at
        FROM judged j CROSS JOIN unnest(p_periods) AS p (period)
        WHERE j.skipped IS NULL AND j.aggregation <> 'time_weighted'
    ), valued AS (
        INSERT INTO meter_aggregations AS a
            (org_id, meter_key, dimensions, period, period_start, value, event_count, latest_at)
        SELECT org_id, key, dimensions, period, period_start,
               CASE min(aggregation)
                   WHEN 'max' THEN max(number)
                   WHEN 'latest' THEN (array_agg(number ORDER BY occurred_at DESC, number DESC))[1]
                   ELSE sum(number)
               END,
               count(*),
               CASE WHEN min(aggregation) = 'latest' THEN max(occurred_at) END
        FROM periods WHERE aggregation <> 'unique_count'
        GROUP BY org_id, key, dimensions, period, period_start
        ORDER BY org_id, key, period, period_start, dimensions
        ON CONFLICT (org_id, meter_key, period, period_start, dimensions) DO UPDATE
        SET value = CASE
                        WHEN a.latest_at IS NOT NULL THEN
                            CASE WHEN (excluded.latest_at, excluded.value) > (a.latest_at, a.value)
                                 THEN excluded.value ELSE a.value END
                        WHEN (SELECT aggregation FROM meters WHERE key = a.meter_key) = 'max'
                            THEN greatest(a.value, excluded.value)
                        ELSE a.value + excluded.value
                    END,
            latest_at = greatest(a.latest_at, excluded.latest_at),
            event_count = a.event_count + excluded.event_count,
            updated_at = now()
        RETURNING 1
    ), new_values AS (
        INSERT INTO meter_unique_values (org_id, meter_key, dimensions, period, period_start, value)
        SELECT DISTINCT org_id, key, dimensions, period, period_start, unique_value
        FROM periods WHERE aggregation = 'unique_count'
        ORDER BY 1, 2, 3, 4, 5, 6
        ON CONFLICT DO NOTHING
        RETURNING org_id, meter_key, dimensions, period, period_start
    ), unique_events AS (
        SELECT org_id, key AS meter_key, dimensions, period, period_start, count(*) AS events
        FROM periods WHERE aggregation = 'unique_count'
        GROUP BY 1, 2, 3, 4, 5
    ), unique_added AS (
        SELECT org_id, meter_key, dimensions, period, period_start, count(*) AS added
        FROM new_values GROUP BY 1, 2, 3, 4, 5
    ), counted_unique AS (
        INSERT INTO meter_aggregations AS a
            (org_id, meter_key, dimensions, period, period_start, value, event_count)
        SELECT u.org_id, u.meter_key, u.dimensions, u.period, u.period_start,
               coalesce(n.added, 0), u.events
        FROM unique_events u
        LEFT JOIN unique_added n USING (org_id, meter_key, dimensions, period, period_start)
        ORDER BY 1, 2, 4, 5, 3
        ON CONFLICT (org_id, meter_key, period, period_start, dimensions) DO UPDATE
        SET value = a.value + excluded.value,
            event_count = a.event_count + excluded.event_count,
            updated_at = now()
        RETURNING 1
    )
    -- every data-modifying CTE runs to completion whether it is read or not
    SELECT count(*) INTO counted FROM judged;
    RETURN counted;
END;
$function$;

-- The meter pass's counting: meters seen for the first time start counting at this
-- pass's lower bound, which the backfill counts up to; then the pass's events are counted
-- for every meter that is not builtin or archived. Returns how many (event, meter) pairs
-- it read.
CREATE OR REPLACE FUNCTION public.count_new_meter_events(p_from_xid bigint, p_to_xid bigint)
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM meters WHERE NOT builtin AND status <> 'archived') THEN
        RETURN 0;
    END IF;
    UPDATE meters SET counted_from_xid = p_from_xid
    WHERE counted_from_xid IS NULL AND NOT builtin AND status <> 'archived';
    RETURN count_meter_events(NULL, p_from_xid, p_to_xid, NULL, NULL);
END;
$function$;

-- One meter pass in one call (aggregator/meter_store.py runs it in a REPEATABLE READ
-- transaction of its own, on a watermark of its own, aggregator_state 'meters'): count the
-- events of the transactions in [from_xid, to_xid) for every meter that is not builtin,
-- recount the periods of the events cancelled in that range, then the usage of the limits those meters count, in the months the pass wrote, that
-- reaches the lowest threshold, with the thresholds already recorded (a bit mask), as
-- aggregation_pass does for the seeded meters. Apart from the v1 pass, so that meters
-- defined by users can never delay the seeded meters' numbers and crossings.
CREATE OR REPLACE FUNCTION public.meter_pass(p_from_xid bigint, p_to_xid bigint, OUT pairs bigint, OUT limit_orgs uuid[], OUT limit_features text[], OUT limit_periods text[], OUT limit_starts date[], OUT limit_used numeric[], OUT limit_values bigint[], OUT limit_thresholds integer[], OUT limit_notified integer[])
 RETURNS record
 LANGUAGE plpgsql
AS $function$
BEGIN
    pairs := count_new_meter_events(p_from_xid, p_to_xid);
    PERFORM recount_cancelled_meter_periods(p_from_xid, p_to_xid);
    WITH touched AS (
        SELECT coalesce(array_agg(t.org_id), '{}') AS orgs,
               coalesce(array_agg(t.meter_key), '{}') AS keys,
               coalesce(array_agg(t.month), '{}') AS months,
               coalesce(array_agg(t.value), '{}') AS month_values
        FROM touched_limited_meter_months() AS t
    )
    SELECT coalesce(array_agg(u.org_id), '{}'), coalesce(array_agg(u.feature_key), '{}'),
           coalesce(array_agg(u.period), '{}'), coalesce(array_agg(u.period_start), '{}'),
           coalesce(array_agg(u.used), '{}'), coalesce(array_agg(u.limit_value), '{}'),
           coalesce(array_agg(padded_thresholds(u.thresholds)), '{}'),
           coalesce(array_agg(u.notified), '{}')
    INTO limit_orgs, limit_features, limit_periods, limit_starts, limit_used, limit_values,
         limit_thresholds, limit_notified
    FROM touched,
         touched_limit_usage(touched.orgs, touched.keys, touched.months, touched.month_values)
             AS u;
END;
$function$;

-- One meter's rows of `p_org` for the periods `p_period` starting in [p_from_at, p_to_at)
-- (to the end when p_to_at is NULL) in `p_zone`, and its readings (time_weighted) in that
-- range, counted again from the events below `p_upto_xid` that the meter counts, leaving
-- out those cancelled below it: the meter passes' events (from counted_from_xid), and the
-- backfill's below that (all of them for an active meter, those up to the backfill's
-- position for a backfilling one). Meters not counting yet or archived are left as they are.
CREATE OR REPLACE FUNCTION public.recount_meter(p_key text, p_org uuid, p_period text, p_zone text, p_from_at timestamp with time zone, p_to_at timestamp with time zone, p_upto_xid bigint)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
    m  record;
BEGIN
    SELECT key, status, counted_from_xid, backfill_after_org, backfill_after_at INTO m
    FROM meters WHERE key = p_key AND NOT builtin;
    IF m.key IS NULL OR m.status = 'archived' OR m.counted_from_xid IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM meter_aggregations
    WHERE org_id = p_org AND meter_key = p_key AND period = p_period
      AND period_start >= (p_from_at AT TIME ZONE p_zone)::date
      AND (p_to_at IS NULL OR period_start < (p_to_at AT TIME ZONE p_zone)::date);
    DELETE FROM meter_unique_values
    WHERE org_id = p_org AND meter_key = p_key AND period = p_period
      AND period_start >= (p_from_at AT TIME ZONE p_zone)::date
      AND (p_to_at IS NULL OR period_start < (p_to_at AT TIME ZONE p_zone)::date);
    DELETE FROM meter_readings
    WHERE org_id = p_org AND meter_key = p_key AND occurred_at >= p_from_at
      AND (p_to_at IS NULL OR occurred_at < p_to_at);
    PERFORM count_meter_events(ARRAY[p_key], m.counted_from_xid, p_upto_xid, p_from_at, p_to_at,
                               p_org, ARRAY[p_period]);
    IF m.status = 'active' THEN
        PERFORM count_meter_events(ARRAY[p_key], 0, m.counted_from_xid, p_from_at, p_to_at,
                                   p_org, ARRAY[p_period], NULL, NULL, NULL, NULL, p_upto_xid);
    ELSIF m.backfill_after_org IS NOT NULL THEN
        -- the part of the backfill done so far
        PERFORM count_meter_events(ARRAY[p_key], 0, m.counted_from_xid, p_from_at, p_to_at,
                                   p_org, ARRAY[p_period], NULL, NULL, m.backfill_after_org,
                                   m.backfill_after_at, p_upto_xid);
    END IF;
END;
$function$;

-- After an organization's time zone changed (reaggregate_org_after_zone_change): its rows
-- of the meters that count for the periods after the one holding the retention horizon
-- are counted again in the new zone (recount_meter, at the meters' watermark). Archived
-- meters keep their rows as they were.
CREATE OR REPLACE FUNCTION public.recount_meters_of_org(p_org uuid, p_horizon timestamp with time zone, p_zone text)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
    m          record;
    p          text;
    boundary   timestamp;
    watermark  bigint;
BEGIN
    SELECT watermark_xid INTO watermark FROM aggregator_state WHERE name = 'meters';
    FOREACH p IN ARRAY ARRAY['day', 'month'] LOOP
        boundary := CASE WHEN p_horizon IS NULL THEN '-infinity'::timestamp
                         ELSE date_trunc(p, p_horizon AT TIME ZONE p_zone)
                              + ('1 ' || p)::interval END;
        FOR m IN SELECT key FROM meters
                 WHERE NOT builtin AND status <> 'archived' AND counted_from_xid IS NOT NULL LOOP
            PERFORM recount_meter(m.key, p_org, p, p_zone, boundary AT TIME ZONE p_zone, NULL,
                                  watermark);
        END LOOP;
    END LOOP;
END;
$function$;

-- The cancellations of the transactions in [from_xid, to_xid) (contract section 10): for
-- every meter counting (recount_meter) the type of a cancelled event, the day and the month
-- the event was in, in its org's zone, are counted again at to_xid. Returns how many
-- (period, meter) recounts it made.
CREATE OR REPLACE FUNCTION public.recount_cancelled_meter_periods(p_from_xid bigint, p_to_xid bigint)
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
DECLARE
    w        record;
    recounts bigint := 0;
BEGIN
    FOR w IN
        SELECT DISTINCT m.key, e.org_id, p.period, z.zone,
               date_trunc(p.period, e.occurred_at AT TIME ZONE z.zone) AT TIME ZONE z.zone
                   AS start_at,
               (date_trunc(p.period, e.occurred_at AT TIME ZONE z.zone)
                   + ('1 ' || p.period)::interval) AT TIME ZONE z.zone AS end_at
        FROM usage_events e
        JOIN meters m ON m.event_type = e.event_type AND NOT m.builtin
                     AND m.status <> 'archived' AND m.counted_from_xid IS NOT NULL
        LEFT JOIN org_subscriptions s ON s.org_id = e.org_id
        CROSS JOIN LATERAL (SELECT coalesce(s.timezone, 'UTC') AS zone) z
        CROSS JOIN (VALUES ('day'), ('month')) AS p (period)
        WHERE e.cancel_xid >= p_from_xid AND e.cancel_xid < p_to_xid
        ORDER BY 1, 2, 3, 5
    LOOP
        PERFORM recount_meter(w.key, w.org_id, w.period, w.zone, w.start_at, w.end_at,
                              p_to_xid);
        recounts := recounts + 1;
    END LOOP;
    RETURN recounts;
END;
$function$;

-- The month rows this transaction wrote of the meters that are not builtin and count
-- against a limit (they have no dimensions): the pass's limit check takes them with the
-- seeded meters' (meter_pass). A row written now has updated_at = now(), the transaction's
-- start; meter passes and backfill chunks run one at a time.
CREATE OR REPLACE FUNCTION public.touched_limited_meter_months()
 RETURNS TABLE(org_id uuid, meter_key text, month date, value numeric)
 LANGUAGE sql
 STABLE
AS $function$
    SELECT a.org_id, a.meter_key, a.period_start, a.value
    FROM meter_aggregations a
    JOIN meters m ON m.key = a.meter_key
    WHERE m.limit_key IS NOT NULL AND NOT m.builtin AND m.status <> 'archived'
      AND a.period = 'month' AND a.dimensions = '{}' AND a.updated_at = now()
$function$;

-- time_weighted (contract section 2): per window of `p_window` (hour, day, month) in
-- `p_zone` starting in [p_from, p_to), per dimension values kept (`p_kept`; the others are
-- added up), Σ value × hours in force inside the window: the readings of each series form
-- a step function, the last reading before the window carries in, and a window not over at
-- `p_now` counts up to then. `event_count` is the number of readings inside the window.
-- Windows with nothing in force are left out. Value·hours are rounded to 12 decimals.
CREATE OR REPLACE FUNCTION public.time_weighted_usage(p_org uuid, p_key text, p_window text, p_zone text, p_from timestamp with time zone, p_to timestamp with time zone, p_now timestamp with time zone, p_kept text[], p_filter jsonb)
 RETURNS TABLE(window_start timestamp with time zone, dimensions text, value numeric, event_count bigint)
 LANGUAGE sql
 STABLE
AS $function$
    WITH windows AS (
        SELECT t AS start, t + interval '1 hour' AS next
        FROM generate_series(p_from, p_to - interval '1 microsecond', interval '1 hour') AS t
        WHERE p_window = 'hour' AND t < p_now
        UNION ALL
        SELECT t AT TIME ZONE p_zone, (t + ('1 ' || p_window)::interval) AT TIME ZONE p_zone
        FROM generate_series(p_from AT TIME ZONE p_zone,
                             (p_to AT TIME ZONE p_zone) - interval '1 microsecond',
                             ('1 ' || p_window)::interval) AS t
        WHERE p_window <> 'hour' AND t AT TIME ZONE p_zone < p_now
    ), series AS (
        SELECT r.dimensions, r.occurred_at, r.value,
               lead(r.occurred_at) OVER (PARTITION BY r.dimensions ORDER BY r.occurred_at)
                   AS until
        FROM meter_readings r
        WHERE r.org_id = p_org AND r.meter_key = p_key AND r.occurred_at < p_to
          AND r.dimensions @> p_filter
    ), kept AS (
        SELECT (SELECT coalesce(jsonb_object_agg(k, s.dimensions -> k), '{}'::jsonb)
                FROM unnest(p_kept) AS k) AS dims,
               s.occurred_at, s.value, coalesce(s.until, 'infinity') AS until
        FROM series s
        WHERE coalesce(s.until, 'infinity') > p_from
    )
    -- value·seconds is exact; value·hours is rounded once, half away from zero, to 12
    -- decimal places (aggregator.semantics.time_weighted_value does the same)
    SELECT w.start, k.dims::text,
           round(sum(k.value * extract(epoch FROM least(k.until, w.next, p_now)
                                                - greatest(k.occurred_at, w.start))) / 3600, 12),
           count(*) FILTER (WHERE k.occurred_at >= w.start AND k.occurred_at < w.next)
    FROM windows w
    JOIN kept k ON k.occurred_at < least(w.next, p_now) AND k.until > w.start
    GROUP BY w.start, k.dims
$function$;
