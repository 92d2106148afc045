-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Usage per billing cycle (contract section 8, migration 021), served like the day and
-- month rows (GET /v1/orgs/{org}/usage?period=cycle, and SQL for billing): each seeded
-- meter's usage in every cycle of the organization whose start is in [p_from, p_to), read
-- from the day rows as the limits read it (usage_in_cycle, 50_limits.sql): sums add, a
-- `latest` gauge is the last day's reading in the cycle, distinct users are counted over
-- the cycle's days. No rows for an organization without a billing anchor.
CREATE OR REPLACE FUNCTION public.usage_by_cycle(p_org_id uuid, p_from date, p_to date, p_type text DEFAULT NULL::text)
 RETURNS TABLE(event_type text, period text, period_start date, period_end date, value numeric, event_count bigint, updated_at timestamp with time zone)
 LANGUAGE sql
 STABLE
AS $function$
    WITH cycles AS (
        SELECT DISTINCT c.cycle_start, c.cycle_end
        FROM org_subscriptions s
        CROSS JOIN LATERAL generate_series(p_from, p_to - 1, interval '1 day') AS d (day)
        CROSS JOIN LATERAL billing_cycle(s.billing_anchor, d.day::date) c
        WHERE s.org_id = p_org_id AND s.billing_anchor IS NOT NULL
    )
    SELECT a.event_type, 'cycle', c.cycle_start, c.cycle_end,
           CASE t.aggregation
               WHEN 'distinct_users' THEN (
                   SELECT count(DISTINCT u.user_id) FROM usage_period_users u
                   WHERE u.org_id = p_org_id AND u.event_type = a.event_type
                     AND u.period = 'day'
                     AND u.period_start >= c.cycle_start AND u.period_start < c.cycle_end)
               WHEN 'gauge_latest' THEN (array_agg(a.value ORDER BY a.period_start DESC))[1]
               ELSE sum(a.value)
           END,
           sum(a.event_count)::bigint, max(a.updated_at)
    FROM cycles c
    JOIN usage_aggregations a
      ON a.org_id = p_org_id AND a.period = 'day'
     AND a.period_start >= c.cycle_start AND a.period_start < c.cycle_end
    JOIN event_types t ON t.event_type = a.event_type
    WHERE c.cycle_start >= p_from AND c.cycle_start < p_to
      AND (p_type IS NULL OR a.event_type = p_type)
    GROUP BY a.event_type, t.aggregation, c.cycle_start, c.cycle_end
    ORDER BY c.cycle_start, a.event_type
$function$;
