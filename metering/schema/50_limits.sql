-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies this folder when it changes.
--
-- Limits: what counts as "used" for a limit, the access check of contract section 4, and
-- the crossings the pass records. One definition of "used" (usage_for_limit) serves both.

-- Usage of one org against one limit key for the period holding `month` (lifetime keys:
-- every month; max_seats: the subscription's seats in use).
CREATE OR REPLACE FUNCTION public.usage_for_limit(p_org_id uuid, p_feature_key text, p_month date)
 RETURNS numeric
 LANGUAGE plpgsql
 STABLE
AS $function$
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
$function$;

-- For the limits the pass touched: their usage and the thresholds already recorded.
CREATE OR REPLACE FUNCTION public.touched_limit_usage(p_orgs uuid[], p_types text[], p_months date[], p_values numeric[], p_thresholds integer[])
 RETURNS TABLE(org_id uuid, feature_key text, period text, period_start date, used numeric, limit_value bigint, notified integer)
 LANGUAGE sql
 STABLE
AS $function$
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
$function$;

-- The access check (contract section 4): limit, used, remaining, allowed.
CREATE OR REPLACE FUNCTION public.check_feature_access(p_user_id uuid, p_feature_key text, p_org_id uuid, p_requested numeric)
 RETURNS jsonb
 LANGUAGE plpgsql
 STABLE
AS $function$
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
$function$;

CREATE OR REPLACE FUNCTION public.check_feature_access(p_user_id uuid, p_feature_key text, p_org_id uuid)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
AS $function$
    SELECT check_feature_access(p_user_id, p_feature_key, p_org_id, 1)
$function$;

-- The organization a metering_reader session may read (row-level security policies):
-- honoured only in the service's own session (migration 014).
CREATE OR REPLACE FUNCTION public.metering_scoped_org()
 RETURNS uuid
 LANGUAGE sql
 STABLE
 SET search_path TO 'pg_catalog', 'pg_temp'
AS $function$
    SELECT CASE
        WHEN pg_has_role(session_user,
                         (SELECT relowner FROM pg_class WHERE oid = 'public.usage_events'::regclass),
                         'MEMBER')
        THEN nullif(current_setting('metering.org_id', true), '')::uuid
    END
$function$;

-- The API's access check in one round trip, as metering_reader scoped to one org.
CREATE OR REPLACE FUNCTION public.reader_check_feature_access(p_org_id uuid, p_feature_key text, p_requested numeric)
 RETURNS jsonb
 LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM set_config('role', 'metering_reader', true);
    PERFORM set_config('metering.org_id', p_org_id::text, true);
    IF NOT EXISTS (SELECT 1 FROM plan_features WHERE feature_key = p_feature_key) THEN
        RETURN NULL;
    END IF;
    RETURN check_feature_access(NULL, p_feature_key, p_org_id, p_requested);
END;
$function$;

REVOKE ALL ON FUNCTION reader_check_feature_access(uuid, text, numeric) FROM PUBLIC;
