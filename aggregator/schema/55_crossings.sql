-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Crossings: the pass's limit check. For the limits its new events touched (p_types: the
-- keys of the meters whose month rows the pass wrote, with their new values; a NULL value:
-- a limit to check again, whatever its usage is now, see limit_rechecks), their usage (as
-- usage_for_limit, metering/schema/50_limits.sql, counts it), the limit that applies and its
-- thresholds (effective_limit), and the thresholds already recorded.

CREATE OR REPLACE FUNCTION public.touched_limit_usage(p_orgs uuid[], p_types text[], p_months date[], p_values numeric[])
 RETURNS TABLE(org_id uuid, feature_key text, period text, period_start date, used numeric, limit_value bigint, thresholds integer[], notified integer)
 LANGUAGE sql
 STABLE
AS $function$
    WITH touched AS (
        -- a lifetime limit once, however many of its months the pass wrote
        SELECT DISTINCT ON (g.org_id, t.limit_key, CASE WHEN t.lifetime THEN NULL ELSE g.month END)
               g.org_id, t.event_type, t.limit_key, t.lifetime, t.limit_unit, t.builtin,
               t.aggregation,
               CASE WHEN t.lifetime THEN NULL ELSE g.month END AS month, g.value
        FROM unnest(p_orgs, p_types, p_months, p_values) AS g (org_id, event_type, month, value)
        JOIN (SELECT key AS event_type, limit_key, limit_scope = 'lifetime' AS lifetime,
                     limit_unit, builtin, aggregation
              FROM meters WHERE limit_key IS NOT NULL AND status <> 'archived') t
          ON t.event_type = g.event_type
        ORDER BY g.org_id, t.limit_key, CASE WHEN t.lifetime THEN NULL ELSE g.month END,
                 g.value IS NULL
    ), measured AS (
        SELECT x.org_id, x.limit_key, x.lifetime, x.month, l.limit_value, l.thresholds,
               CASE WHEN x.value IS NULL AND NOT x.lifetime
                        THEN usage_for_limit(x.org_id, x.limit_key, x.month)
                    WHEN x.limit_unit = 1 THEN m.amount
                    ELSE trim_scale(m.amount / x.limit_unit) END AS used
        FROM touched x
        CROSS JOIN LATERAL effective_limit(x.org_id, x.limit_key) l
        CROSS JOIN LATERAL (
            SELECT CASE WHEN NOT x.lifetime THEN x.value
                        WHEN x.builtin
                        THEN (SELECT coalesce(sum(a.value), 0) FROM usage_aggregations a
                              WHERE a.org_id = x.org_id AND a.event_type = x.event_type
                                AND a.period = 'month')
                        ELSE (SELECT coalesce(CASE WHEN x.aggregation = 'max' THEN max(a.value)
                                                   ELSE sum(a.value) END, 0)
                              FROM meter_aggregations a
                              WHERE a.org_id = x.org_id AND a.meter_key = x.event_type
                                AND a.period = 'month' AND a.dimensions = '{}')
                   END AS amount
        ) m
        WHERE l.limit_value IS NOT NULL AND l.limit_value <> -1
    ), reached AS (
        -- a pre-filter: the lowest threshold reached (aggregator.limits.thresholds_reached
        -- decides which ones)
        SELECT r.* FROM measured r
        WHERE CASE WHEN r.limit_value = 0 THEN r.used > 0
                   ELSE r.used * 100 >= r.limit_value * (SELECT min(t) FROM unnest(r.thresholds) t)
              END
    )
    SELECT r.org_id, r.limit_key, CASE WHEN r.lifetime THEN 'lifetime' ELSE 'month' END,
           r.month, r.used, r.limit_value, r.thresholds, n.notified
    FROM reached r
    CROSS JOIN LATERAL (
        -- bit i: r.thresholds[i + 1] is recorded for this period
        SELECT coalesce(bit_or(1 << (array_position(r.thresholds, q.threshold_percent) - 1)),
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
        WHERE q.threshold_percent = ANY (r.thresholds)
    ) n
    WHERE n.notified <> (1 << cardinality(r.thresholds)) - 1
$function$;
