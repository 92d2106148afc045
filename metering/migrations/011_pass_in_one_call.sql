-- A pass is one call: the aggregation and the usage of the limits it touched, in the server.
--
-- 1. aggregation_pass runs aggregate_new_events and then touched_limit_usage on its touched
--    (org, type, month) list, which no longer travels to the aggregator and back (decoded
--    into Python objects and encoded again: ~3,000 values per 100,000 live events in
--    bench.aggregate). It returns the limit rows as arrays, one element per limit, so the
--    aggregator decides crossings from one row. The thresholds already recorded for a limit
--    come back as a bit mask over p_thresholds (bit i set: p_thresholds[i + 1] is recorded);
--    the aggregator, which passed p_thresholds, decodes it.
-- 2. touched_limit_usage finds a limit's recorded thresholds by index conditions only. It
--    matched the period with IS NOT DISTINCT FROM, which an index cannot use, so each lookup
--    read every notification of the (org, feature) since the first month and filtered them:
--    a cost that grew with the months of history, not with the pass. A month limit now
--    matches `period_start = month`, a lifetime limit `period_start IS NULL`.
--
-- Same meaning as 009 (usage_for_limit is still the one definition of "used"); measured in
-- BENCHMARKS.md.

CREATE OR REPLACE FUNCTION touched_limit_usage(p_orgs uuid[], p_types text[], p_months date[],
                                               p_thresholds int[])
RETURNS TABLE (org_id uuid, feature_key text, period text, period_start date, used numeric,
               limit_value bigint, notified int[])
LANGUAGE sql STABLE AS $$
    WITH touched AS (
        SELECT DISTINCT g.org_id, t.limit_key, t.lifetime,
               CASE WHEN t.lifetime THEN NULL ELSE g.month END AS month
        FROM unnest(p_orgs, p_types, p_months) AS g (org_id, event_type, month)
        JOIN event_types t ON t.event_type = g.event_type
    ), open AS MATERIALIZED (
        SELECT x.org_id, x.limit_key, x.lifetime, x.month, pf.limit_value, n.notified
        FROM touched x
        LEFT JOIN org_subscriptions s ON s.org_id = x.org_id
        JOIN plan_features pf ON pf.plan = coalesce(s.plan, 'free')
                             AND pf.feature_key = x.limit_key
        CROSS JOIN LATERAL (
            SELECT coalesce(array_agg(r.threshold_percent ORDER BY r.threshold_percent), '{}')
                       AS notified
            FROM (
                SELECT l.threshold_percent FROM limit_notifications l
                WHERE l.org_id = x.org_id AND l.feature_key = x.limit_key
                  AND l.period_start = x.month
                UNION ALL
                SELECT l.threshold_percent FROM limit_notifications l
                WHERE x.lifetime AND l.org_id = x.org_id AND l.feature_key = x.limit_key
                  AND l.period_start IS NULL
            ) r
        ) n
        WHERE pf.limit_value <> -1 AND NOT (n.notified @> p_thresholds)
    )
    SELECT o.org_id, o.limit_key, CASE WHEN o.lifetime THEN 'lifetime' ELSE 'month' END,
           o.month, usage_for_limit(o.org_id, o.limit_key, o.month), o.limit_value, o.notified
    FROM open o
$$;

-- One incremental pass over the events of transactions [p_from_xid, p_to_xid): what
-- aggregate_new_events promises (the caller holds the aggregator's lock and moves the
-- watermark in the same transaction), plus the usage of every limit it touched that can
-- still notify, as touched_limit_usage gives it.
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
           coalesce(array_agg((SELECT coalesce(sum(1 << (i - 1)), 0)::int
                               FROM generate_subscripts(p_thresholds, 1) AS i
                               WHERE p_thresholds[i] = ANY (u.notified))), '{}')
    INTO limit_orgs, limit_features, limit_periods, limit_starts, limit_used, limit_values,
         limit_notified
    FROM touched_limit_usage(applied.touched_orgs, applied.touched_types,
                             applied.touched_months, p_thresholds) AS u;
END;
$$;
