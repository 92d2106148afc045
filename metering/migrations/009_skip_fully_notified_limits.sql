-- The pass computes the usage only of limits that can still notify.
--
-- touched_limit_usage called usage_for_limit for every touched limit, also for limits whose
-- every threshold is already recorded for that period: those can never produce another
-- message (one per org, feature, period and threshold), so their usage is work thrown away.
-- In bench.aggregate (1,000 touched months per live pass) that was 400 of 750 limits, and
-- in production it is every organization that has gone over its limit this month.
-- The thresholds are the caller's (aggregator/limits.py THRESHOLDS); a limit whose
-- recorded thresholds contain all of them is left out before its usage is computed.

DROP FUNCTION touched_limit_usage(uuid[], text[], date[]);

CREATE FUNCTION touched_limit_usage(p_orgs uuid[], p_types text[], p_months date[],
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
            SELECT coalesce(array_agg(l.threshold_percent ORDER BY l.threshold_percent), '{}')
                       AS notified
            FROM limit_notifications l
            WHERE l.org_id = x.org_id AND l.feature_key = x.limit_key
              AND l.period_start IS NOT DISTINCT FROM x.month
        ) n
        WHERE pf.limit_value <> -1 AND NOT (n.notified @> p_thresholds)
    )
    SELECT o.org_id, o.limit_key, CASE WHEN o.lifetime THEN 'lifetime' ELSE 'month' END,
           o.month, usage_for_limit(o.org_id, o.limit_key, o.month), o.limit_value, o.notified
    FROM open o
$$;
