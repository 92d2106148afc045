-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Crossings: the pass's limit check. For the limits its new events touched (p_types: the
-- keys of the meters whose month rows the pass wrote, with their new values; a NULL value:
-- a limit to check again, whatever its usage is now, see limit_rechecks), their usage (as
-- usage_for_limit, metering/schema/50_limits.sql, counts it), the limit that applies and its
-- thresholds (effective_limit), and the thresholds already recorded. An organization with a
-- billing anchor counts its period-scoped limits per cycle (contract section 8), read from
-- the day rows (usage_in_cycle).

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
    ), periods AS (
        -- the periods each touched month's limit counts in: the month itself (no anchor, or
        -- a lifetime limit), or the billing cycles that overlap it (at most two: the one
        -- holding its first day and the one holding its last)
        SELECT DISTINCT x.*, p.period, p.start, p.finish
        FROM touched x
        LEFT JOIN org_subscriptions s ON s.org_id = x.org_id
        CROSS JOIN LATERAL (
            SELECT CASE WHEN x.lifetime THEN 'lifetime' ELSE 'month' END AS period,
                   x.month AS start, NULL::date AS finish
            WHERE x.lifetime OR s.billing_anchor IS NULL
            UNION ALL
            SELECT 'cycle', c.cycle_start, c.cycle_end
            FROM unnest(ARRAY[x.month, (x.month + interval '1 month - 1 day')::date]) AS d (day)
            CROSS JOIN LATERAL billing_cycle(s.billing_anchor, d.day) c
            WHERE NOT x.lifetime AND s.billing_anchor IS NOT NULL
        ) p
    ), measured AS (
        SELECT x.org_id, x.limit_key, x.lifetime, x.period, x.start AS month, l.limit_value,
               l.thresholds,
               CASE WHEN x.period = 'cycle'
                        THEN usage_in_cycle(x.org_id, x.limit_key, x.start, x.finish)
                    WHEN x.value IS NULL AND NOT x.lifetime
                        THEN usage_for_limit(x.org_id, x.limit_key, x.month)
                    WHEN x.limit_unit = 1 THEN m.amount
                    ELSE trim_scale(m.amount / x.limit_unit) END AS used
        FROM periods x
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
    SELECT r.org_id, r.limit_key, r.period, r.month, r.used, r.limit_value, r.thresholds,
           n.notified
    FROM reached r
    CROSS JOIN LATERAL (
        -- bit i: r.thresholds[i + 1] is recorded for this period
        SELECT coalesce(bit_or(1 << (array_position(r.thresholds, q.threshold_percent) - 1)),
                        0) AS notified
        FROM (
            SELECT l.threshold_percent FROM limit_notifications l
            WHERE l.org_id = r.org_id AND l.feature_key = r.limit_key
              AND l.period_start = r.month AND l.period = r.period
            UNION ALL
            SELECT l.threshold_percent FROM limit_notifications l
            WHERE r.lifetime AND l.org_id = r.org_id AND l.feature_key = r.limit_key
              AND l.period_start IS NULL
        ) q
        WHERE q.threshold_percent = ANY (r.thresholds)
    ) n
    WHERE n.notified <> (1 << cardinality(r.thresholds)) - 1
$function$;
