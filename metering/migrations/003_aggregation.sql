-- Daily and monthly aggregates (contract sections 2 and 4), the incremental aggregator's
-- durable watermark, threshold-crossing outbox, the access check and the recompute.

CREATE TABLE usage_aggregations (
    org_id          uuid    NOT NULL,
    event_type      text    NOT NULL REFERENCES event_types (event_type),
    period          text    NOT NULL CHECK (period IN ('day', 'month')),
    period_start    date    NOT NULL,            -- in the organization's time zone
    value           numeric NOT NULL DEFAULT 0,  -- sum, latest gauge reading, or distinct users
    event_count     bigint  NOT NULL DEFAULT 0,
    gauge_at        timestamptz,                 -- gauges: occurred_at of the reading in value
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, event_type, period, period_start)
);

-- Exact distinct users: one row per user seen in a period.
CREATE TABLE usage_period_users (
    org_id        uuid NOT NULL,
    event_type    text NOT NULL,
    period        text NOT NULL,
    period_start  date NOT NULL,
    user_id       uuid NOT NULL,
    PRIMARY KEY (org_id, event_type, period, period_start, user_id)
);

-- The incremental aggregator's watermark: every usage_events row whose ingest_xid is
-- below it has been aggregated. It is the xmin of the snapshot of the pass that set it,
-- so every transaction below it had finished: no row can appear below it later.
CREATE TABLE aggregator_state (
    name           text PRIMARY KEY,
    watermark_xid  bigint NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO aggregator_state (name, watermark_xid) VALUES ('usage', 0);

-- One row per aggregation pass: which transactions it covered and when it committed.
-- Lets an operator (and the freshness benchmark) tell when any event was aggregated.
CREATE TABLE aggregation_passes (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    from_xid      bigint NOT NULL,
    to_xid        bigint NOT NULL,
    events        bigint NOT NULL,
    finished_at   timestamptz NOT NULL
);
CREATE INDEX aggregation_passes_to_xid ON aggregation_passes (to_xid);

-- Threshold crossings, written in the aggregation transaction (an outbox) and published
-- to Kafka afterwards. The id is deterministic, so a crossing is recorded once.
CREATE TABLE limit_notifications (
    id                 uuid PRIMARY KEY,
    org_id             uuid    NOT NULL,
    feature_key        text    NOT NULL,
    period             text    NOT NULL CHECK (period IN ('month', 'lifetime')),
    period_start       date,              -- NULL for lifetime limits (max_records)
    threshold_percent  int     NOT NULL,
    used               numeric NOT NULL,
    limit_value        bigint  NOT NULL,
    crossed_at         timestamptz NOT NULL,
    published_at       timestamptz
);
CREATE INDEX limit_notifications_unpublished ON limit_notifications (crossed_at)
    WHERE published_at IS NULL;

-- Each event of a transaction range, once per period, with the period's first day in the
-- organization's time zone (calendar days and months, correct across DST changes).
CREATE FUNCTION usage_event_periods(p_from_xid bigint, p_to_xid bigint)
RETURNS TABLE (org_id uuid, event_type text, aggregation text, period text, period_start date,
               quantity numeric, occurred_at timestamptz, event_id text, user_id uuid)
LANGUAGE sql STABLE AS $$
    SELECT e.org_id, e.event_type, t.aggregation, p.period,
           CASE p.period
               WHEN 'day' THEN (e.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))::date
               ELSE date_trunc('month', e.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))::date
           END,
           e.quantity, e.occurred_at, e.event_id, e.user_id
    FROM usage_events e
    JOIN event_types t ON t.event_type = e.event_type
    LEFT JOIN org_subscriptions s ON s.org_id = e.org_id
    CROSS JOIN (VALUES ('day'), ('month')) AS p (period)
    WHERE e.ingest_xid >= p_from_xid AND e.ingest_xid < p_to_xid
$$;

-- Adds the events of [p_from_xid, p_to_xid) to usage_aggregations. Not idempotent by
-- itself: callers run it once per range, in the transaction that moves the watermark.
-- The planner cannot estimate a range of brand-new transaction ids (they lie beyond the
-- column statistics) and guesses one row, then loops over org_subscriptions per event;
-- hash joins are right for every delta size, so nested loops are off for these functions.
-- JIT is off too: the disabled nested loops inflate plan costs past jit_above_cost and
-- each statement then spent ~0.5 s compiling (measured: 2 s of a 12k-event pass).
CREATE FUNCTION apply_usage_delta(p_from_xid bigint, p_to_xid bigint)
RETURNS bigint
LANGUAGE plpgsql
SET enable_nestloop = off
SET jit = off
SET work_mem = '256MB'
AS $$
DECLARE
    aggregated bigint;
BEGIN
    -- One scan of the new events, aggregated per day in each org's zone; the month rows are
    -- rolled up from those day rows (sums of sums, latest of latest readings), so the
    -- events are read and grouped once, not once per period.
    WITH delta AS MATERIALIZED (
        SELECT e.org_id, e.event_type, t.aggregation, e.quantity, e.occurred_at, e.user_id,
               (e.occurred_at AT TIME ZONE coalesce(s.timezone, 'UTC'))::date AS day
        FROM usage_events e
        JOIN event_types t ON t.event_type = e.event_type
        LEFT JOIN org_subscriptions s ON s.org_id = e.org_id
        WHERE e.ingest_xid >= p_from_xid AND e.ingest_xid < p_to_xid
    ), days AS MATERIALIZED (
        SELECT org_id, event_type, day, count(*) AS events,
               sum(quantity) FILTER (WHERE aggregation = 'sum') AS total,
               max(ARRAY[extract(epoch FROM occurred_at), quantity])
                   FILTER (WHERE aggregation = 'gauge_latest') AS reading
        FROM delta WHERE aggregation <> 'distinct_users'
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
               coalesce(total, reading[2]), events,
               CASE WHEN reading IS NOT NULL THEN to_timestamp(reading[1]) END
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
        SELECT org_id, event_type, day, user_id FROM delta WHERE aggregation = 'distinct_users'
    ), user_periods AS (
        SELECT DISTINCT org_id, event_type, 'day' AS period, day AS period_start, user_id FROM seen
        UNION
        SELECT DISTINCT org_id, event_type, 'month', date_trunc('month', day)::date, user_id FROM seen
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
        SELECT org_id, event_type, 'day' AS period, day AS period_start, count(*) AS events
        FROM seen GROUP BY 1, 2, 4
        UNION ALL
        SELECT org_id, event_type, 'month', date_trunc('month', day)::date, count(*)
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
    )
    SELECT (SELECT count(*) FROM delta) INTO aggregated
    FROM (SELECT count(*) FROM counted) AS c, (SELECT count(*) FROM user_rows) AS r;
    RETURN aggregated;
END;
$$;

-- What a limit check reads: the used amount of a limit key for an organization in the
-- month containing p_at (in its zone); lifetime keys sum every month; gauges take the
-- latest reading; seats come from the subscription. Already divided by the limit unit.
CREATE FUNCTION usage_for_limit(p_org_id uuid, p_feature_key text, p_month date)
RETURNS numeric
LANGUAGE plpgsql STABLE AS $$
DECLARE
    kind  event_types%ROWTYPE;
    used  numeric;
BEGIN
    IF p_feature_key = 'max_seats' THEN
        SELECT coalesce((SELECT seats_in_use FROM org_subscriptions WHERE org_id = p_org_id), 0)
        INTO used;
        RETURN used;
    END IF;
    SELECT * INTO kind FROM event_types WHERE limit_key = p_feature_key;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF kind.lifetime THEN
        SELECT coalesce(sum(value), 0) INTO used FROM usage_aggregations
        WHERE org_id = p_org_id AND event_type = kind.event_type AND period = 'month';
    ELSIF kind.aggregation = 'gauge_latest' THEN
        -- storage persists across months: the latest reading up to the end of that month
        SELECT coalesce((SELECT value FROM usage_aggregations
                         WHERE org_id = p_org_id AND event_type = kind.event_type
                           AND period = 'month' AND period_start <= p_month
                         ORDER BY period_start DESC LIMIT 1), 0)
        INTO used;
    ELSE
        SELECT coalesce((SELECT value FROM usage_aggregations
                         WHERE org_id = p_org_id AND event_type = kind.event_type
                           AND period = 'month' AND period_start = p_month), 0)
        INTO used;
    END IF;
    IF kind.limit_unit = 1 THEN
        RETURN used;
    END IF;
    RETURN used / kind.limit_unit;
END;
$$;

-- The access check of the source document, with the quantity requested (default 1).
-- Raises no_data_found (P0002) for a feature key no plan has.
CREATE FUNCTION check_feature_access(p_user_id uuid, p_feature_key text, p_org_id uuid,
                                     p_requested numeric)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    sub        record;
    feature    plan_features%ROWTYPE;
    month      date;
    used       numeric;
    remaining  numeric;
BEGIN
    SELECT coalesce(s.plan, 'free') AS plan, coalesce(s.timezone, 'UTC') AS timezone,
           coalesce(s.status, 'active') AS status
    INTO sub
    FROM (SELECT 1) AS one LEFT JOIN org_subscriptions s ON s.org_id = p_org_id;
    SELECT * INTO feature FROM plan_features WHERE plan = sub.plan AND feature_key = p_feature_key;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown feature key %', p_feature_key USING ERRCODE = 'no_data_found';
    END IF;
    IF p_feature_key = 'features' THEN
        RETURN jsonb_build_object('feature_key', p_feature_key, 'plan', sub.plan,
                                  'flags', feature.flags, 'allowed', true);
    END IF;
    month := date_trunc('month', now() AT TIME ZONE sub.timezone)::date;
    used := usage_for_limit(p_org_id, p_feature_key, month);
    IF feature.limit_value = -1 THEN
        RETURN jsonb_build_object('feature_key', p_feature_key, 'plan', sub.plan, 'limit', -1,
                                  'unlimited', true, 'used', used, 'remaining', NULL,
                                  'requested', p_requested, 'allowed', true,
                                  'period_start', month);
    END IF;
    remaining := greatest(feature.limit_value - used, 0);
    RETURN jsonb_build_object('feature_key', p_feature_key, 'plan', sub.plan,
                              'limit', feature.limit_value, 'unlimited', false, 'used', used,
                              'remaining', remaining, 'requested', p_requested,
                              'allowed', used + p_requested <= feature.limit_value,
                              'period_start', month);
END;
$$;

CREATE FUNCTION check_feature_access(p_user_id uuid, p_feature_key text, p_org_id uuid)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT check_feature_access(p_user_id, p_feature_key, p_org_id, 1)
$$;

-- Recomputes the `p_period` rows of every period that overlaps [p_from, p_to) in each
-- organization's zone (optionally one organization) from usage_events. Running it twice
-- changes nothing. It takes the aggregator's lock and counts only events below the
-- watermark: newer ones are added by the next incremental pass, never twice.
-- Two scans: sums and gauges in one hash aggregation, distinct users from their rows only.
CREATE FUNCTION aggregate_usage(p_period text, p_from timestamptz, p_to timestamptz,
                                p_org_id uuid DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET enable_nestloop = off
SET jit = off
SET work_mem = '256MB'
AS $$
DECLARE
    watermark      bigint;
    written        bigint;
    users          bigint;
    unit           interval;
    gauge_types    text[];
    counted_types  text[];
    user_types     text[];
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
           coalesce(array_agg(event_type) FILTER (WHERE aggregation <> 'distinct_users'), '{}'),
           coalesce(array_agg(event_type) FILTER (WHERE aggregation = 'distinct_users'), '{}')
    INTO gauge_types, counted_types, user_types
    FROM event_types;
    SELECT watermark_xid INTO watermark FROM aggregator_state WHERE name = 'usage' FOR UPDATE;

    CREATE TEMP TABLE _windows ON COMMIT DROP AS
    SELECT w.org_id, w.timezone, w.first_start, w.last_start,
           w.first_start::timestamp AT TIME ZONE w.timezone AS first_at,
           (w.last_start + unit)::timestamp AT TIME ZONE w.timezone AS end_at
    FROM (
        SELECT s.org_id, s.timezone,
               date_trunc(p_period, p_from AT TIME ZONE s.timezone)::date AS first_start,
               date_trunc(p_period, (p_to AT TIME ZONE s.timezone) - interval '1 microsecond')::date
                   AS last_start
        FROM org_subscriptions s
        WHERE p_org_id IS NULL OR s.org_id = p_org_id
    ) w;
    ANALYZE _windows;

    DELETE FROM usage_aggregations a USING _windows w
    WHERE a.org_id = w.org_id AND a.period = p_period
      AND a.period_start BETWEEN w.first_start AND w.last_start;
    DELETE FROM usage_period_users a USING _windows w
    WHERE a.org_id = w.org_id AND a.period = p_period
      AND a.period_start BETWEEN w.first_start AND w.last_start;

    INSERT INTO usage_aggregations (org_id, event_type, period, period_start, value, event_count, gauge_at)
    SELECT e.org_id, e.event_type, p_period,
           date_trunc(p_period, e.occurred_at AT TIME ZONE w.timezone)::date,
           CASE WHEN e.event_type = ANY (gauge_types)
                THEN (max(ARRAY[extract(epoch FROM e.occurred_at), e.quantity]))[2]
                ELSE sum(e.quantity)
           END,
           count(*),
           CASE WHEN e.event_type = ANY (gauge_types) THEN max(e.occurred_at) END
    FROM usage_events e
    JOIN _windows w ON w.org_id = e.org_id
    WHERE e.occurred_at >= w.first_at AND e.occurred_at < w.end_at
      AND e.ingest_xid < watermark
      AND e.event_type = ANY (counted_types)
    GROUP BY 1, 2, 4;
    GET DIAGNOSTICS written = ROW_COUNT;

    INSERT INTO usage_period_users (org_id, event_type, period, period_start, user_id)
    SELECT DISTINCT e.org_id, e.event_type, p_period,
           date_trunc(p_period, e.occurred_at AT TIME ZONE w.timezone)::date, e.user_id
    FROM usage_events e
    JOIN _windows w ON w.org_id = e.org_id
    WHERE e.event_type = ANY (user_types)
      AND e.occurred_at >= w.first_at AND e.occurred_at < w.end_at
      AND e.ingest_xid < watermark;

    INSERT INTO usage_aggregations (org_id, event_type, period, period_start, value, event_count)
    SELECT c.org_id, c.event_type, p_period, c.period_start, u.users, c.events
    FROM (
        SELECT e.org_id, e.event_type,
               date_trunc(p_period, e.occurred_at AT TIME ZONE w.timezone)::date AS period_start,
               count(*) AS events
        FROM usage_events e
        JOIN _windows w ON w.org_id = e.org_id
        WHERE e.event_type = ANY (user_types)
          AND e.occurred_at >= w.first_at AND e.occurred_at < w.end_at
          AND e.ingest_xid < watermark
        GROUP BY 1, 2, 3
    ) c
    JOIN (
        SELECT org_id, event_type, period_start, count(*) AS users
        FROM usage_period_users pu
        WHERE pu.period = p_period AND pu.org_id IN (SELECT org_id FROM _windows)
        GROUP BY 1, 2, 3
    ) u USING (org_id, event_type, period_start);
    GET DIAGNOSTICS users = ROW_COUNT;
    DROP TABLE _windows;
    RETURN written + users;
END;
$$;
