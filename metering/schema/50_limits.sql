-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Limits: what counts as "used" for a limit and the access check of contract section 4.
-- One definition of "used" (usage_for_limit) serves the check and the crossings the
-- aggregator records (aggregator/schema/55_crossings.sql).

-- Usage of one org against one limit key for the period holding `month`: what the meter
-- with that `limit_key` counted (contract section 2; the seeded meters count in
-- usage_aggregations by event type, the others in meter_aggregations), divided by its
-- `limit_unit`. Lifetime limits add every month (`max`: the greatest month); a `latest`
-- reading persists across months (the latest one up to the end of that month). NULL when
-- no meter counts the key; max_seats: the subscription's seats in use.
CREATE OR REPLACE FUNCTION public.usage_for_limit(p_org_id uuid, p_feature_key text, p_month date)
 RETURNS numeric
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    meter  record;
    used   numeric;
BEGIN
    IF p_feature_key = 'max_seats' THEN
        SELECT coalesce((SELECT seats_in_use FROM org_subscriptions WHERE org_id = p_org_id), 0)
        INTO used;
        RETURN used;
    END IF;
    SELECT key, aggregation, limit_scope, limit_unit, builtin INTO meter
    FROM meters WHERE limit_key = p_feature_key AND status <> 'archived';
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF meter.builtin THEN
        IF meter.limit_scope = 'lifetime' THEN
            SELECT coalesce(sum(value), 0) INTO used FROM usage_aggregations
            WHERE org_id = p_org_id AND event_type = meter.key AND period = 'month';
        ELSIF meter.aggregation = 'latest' THEN
            SELECT coalesce((SELECT value FROM usage_aggregations
                             WHERE org_id = p_org_id AND event_type = meter.key
                               AND period = 'month' AND period_start <= p_month
                             ORDER BY period_start DESC LIMIT 1), 0)
            INTO used;
        ELSE
            SELECT coalesce((SELECT value FROM usage_aggregations
                             WHERE org_id = p_org_id AND event_type = meter.key
                               AND period = 'month' AND period_start = p_month), 0)
            INTO used;
        END IF;
    ELSIF meter.limit_scope = 'lifetime' THEN
        SELECT coalesce(CASE WHEN meter.aggregation = 'max' THEN max(value) ELSE sum(value) END, 0)
        INTO used FROM meter_aggregations
        WHERE org_id = p_org_id AND meter_key = meter.key AND period = 'month'
          AND dimensions = '{}';
    ELSIF meter.aggregation = 'latest' THEN
        SELECT coalesce((SELECT value FROM meter_aggregations
                         WHERE org_id = p_org_id AND meter_key = meter.key
                           AND period = 'month' AND dimensions = '{}'
                           AND period_start <= p_month
                         ORDER BY period_start DESC LIMIT 1), 0)
        INTO used;
    ELSE
        SELECT coalesce((SELECT value FROM meter_aggregations
                         WHERE org_id = p_org_id AND meter_key = meter.key
                           AND period = 'month' AND dimensions = '{}'
                           AND period_start = p_month), 0)
        INTO used;
    END IF;
    IF meter.limit_unit = 1 THEN
        RETURN used;
    END IF;
    RETURN trim_scale(used / meter.limit_unit);
END;
$function$;

-- The billing cycle holding local day `p_day` for an anchor (contract section 8): from the
-- anchor's day of month (the month's last day when it has fewer days) to the same day of
-- the next month. metering.calendar.billing_cycle is the same rule in Python.
CREATE OR REPLACE FUNCTION public.anchored_day(p_anchor date, p_month date)
 RETURNS date
 LANGUAGE sql
 IMMUTABLE
AS $function$
    SELECT (date_trunc('month', p_month)::date
            + (least(extract(day FROM p_anchor)::int,
                     extract(day FROM date_trunc('month', p_month)
                                      + interval '1 month - 1 day')::int) - 1))
$function$;

-- (a table function of one row, which the planner inlines, as effective_limit)
CREATE OR REPLACE FUNCTION public.billing_cycle(p_anchor date, p_day date)
 RETURNS TABLE(cycle_start date, cycle_end date)
 LANGUAGE sql
 IMMUTABLE
AS $function$
    SELECT s.start,
           anchored_day(p_anchor, (date_trunc('month', s.start) + interval '1 month')::date)
    FROM (SELECT CASE WHEN p_day >= anchored_day(p_anchor, p_day) THEN anchored_day(p_anchor, p_day)
                      ELSE anchored_day(p_anchor, (date_trunc('month', p_day)
                                                   - interval '1 month')::date)
                 END AS start) s
$function$;

-- Usage of one org against one limit key in the cycle [p_start, p_end) (local days), read
-- from the day rows as usage_for_limit reads the month's: what the meter with that
-- `limit_key` counted, divided by its `limit_unit`; a `latest` reading persists (the latest
-- day row before the cycle's end); distinct values are counted over the cycle's days.
CREATE OR REPLACE FUNCTION public.usage_in_cycle(p_org_id uuid, p_feature_key text, p_start date, p_end date)
 RETURNS numeric
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    meter  record;
    used   numeric;
BEGIN
    SELECT key, aggregation, limit_unit, builtin INTO meter
    FROM meters WHERE limit_key = p_feature_key AND status <> 'archived';
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF meter.builtin THEN
        IF meter.aggregation = 'latest' THEN
            SELECT coalesce((SELECT value FROM usage_aggregations
                             WHERE org_id = p_org_id AND event_type = meter.key
                               AND period = 'day' AND period_start < p_end
                             ORDER BY period_start DESC LIMIT 1), 0)
            INTO used;
        ELSIF meter.aggregation = 'unique_count' THEN
            SELECT count(DISTINCT user_id) INTO used FROM usage_period_users
            WHERE org_id = p_org_id AND event_type = meter.key AND period = 'day'
              AND period_start >= p_start AND period_start < p_end;
        ELSE
            SELECT coalesce(sum(value), 0) INTO used FROM usage_aggregations
            WHERE org_id = p_org_id AND event_type = meter.key AND period = 'day'
              AND period_start >= p_start AND period_start < p_end;
        END IF;
    ELSIF meter.aggregation = 'latest' THEN
        SELECT coalesce((SELECT value FROM meter_aggregations
                         WHERE org_id = p_org_id AND meter_key = meter.key AND period = 'day'
                           AND dimensions = '{}' AND period_start < p_end
                         ORDER BY period_start DESC LIMIT 1), 0)
        INTO used;
    ELSIF meter.aggregation = 'unique_count' THEN
        SELECT count(DISTINCT value) INTO used FROM meter_unique_values
        WHERE org_id = p_org_id AND meter_key = meter.key AND period = 'day'
          AND dimensions = '{}' AND period_start >= p_start AND period_start < p_end;
    ELSE
        SELECT coalesce(CASE WHEN meter.aggregation = 'max' THEN max(value) ELSE sum(value) END, 0)
        INTO used FROM meter_aggregations
        WHERE org_id = p_org_id AND meter_key = meter.key AND period = 'day'
          AND dimensions = '{}' AND period_start >= p_start AND period_start < p_end;
    END IF;
    IF meter.limit_unit = 1 THEN
        RETURN used;
    END IF;
    RETURN trim_scale(used / meter.limit_unit);
END;
$function$;

-- The period a limit of an organization counts in on local day `p_day`: its billing cycle
-- when it has an anchor and the limit is period-scoped, else the calendar month (lifetime
-- limits: the month too, as usage_for_limit reads them); with the usage in it.
CREATE OR REPLACE FUNCTION public.limit_period_usage(p_org_id uuid, p_feature_key text, p_day date, OUT period text, OUT period_start date, OUT period_end date, OUT used numeric)
 RETURNS record
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    anchor  date;
BEGIN
    SELECT s.billing_anchor INTO anchor FROM org_subscriptions s WHERE s.org_id = p_org_id;
    IF anchor IS NOT NULL AND EXISTS (
        SELECT 1 FROM meters m WHERE m.limit_key = p_feature_key AND m.status <> 'archived'
          AND m.limit_scope = 'period')
    THEN
        -- billing_cycle's rule, as expressions: a statement here would be planned again on
        -- every call (its custom plans, folded to constants, look cheaper than a generic one)
        period := 'cycle';
        period_start := CASE WHEN p_day >= anchored_day(anchor, p_day)
                             THEN anchored_day(anchor, p_day)
                             ELSE anchored_day(anchor, (p_day - interval '1 month')::date) END;
        period_end := anchored_day(anchor, (period_start + interval '1 month')::date);
        used := usage_in_cycle(p_org_id, p_feature_key, period_start, period_end);
        RETURN;
    END IF;
    period := 'month';
    period_start := date_trunc('month', p_day)::date;
    period_end := (period_start + interval '1 month')::date;
    used := usage_for_limit(p_org_id, p_feature_key, period_start);
END;
$function$;

-- Which limit applies to an organization's feature (contract section 8): its own override
-- (org_limit_overrides) when it has one, else its plan's row (the free plan without a
-- subscription). `limit_value` NULL: neither exists; -1: unlimited. The one definition,
-- used by the access check and by the crossings (aggregator/schema/55_crossings.sql).
-- One row, as a table function: the planner inlines it into the calling query (a SQL
-- function returning a record is planned again on every call: 0.36 ms of each check).
CREATE OR REPLACE FUNCTION public.effective_limit(p_org_id uuid, p_feature_key text)
 RETURNS TABLE(limit_value bigint, soft boolean, thresholds integer[], source text, plan text)
 LANGUAGE sql
 STABLE
AS $function$
    SELECT coalesce(o.limit_value, pf.limit_value), coalesce(o.soft, false),
           coalesce(o.thresholds, pf.thresholds, '{80,100}'),
           CASE WHEN o.org_id IS NOT NULL THEN 'override' ELSE 'plan' END, p.plan
    FROM (SELECT coalesce((SELECT s.plan FROM org_subscriptions s WHERE s.org_id = p_org_id),
                          'free') AS plan) p
    LEFT JOIN plan_features pf ON pf.plan = p.plan AND pf.feature_key = p_feature_key
    LEFT JOIN org_limit_overrides o ON o.org_id = p_org_id AND o.feature_key = p_feature_key
$function$;

-- The access check (contract sections 4 and 8): limit, used, remaining, allowed; a soft
-- limit never refuses and reports its overage; `source` says whether the limit is the
-- plan's or the organization's own.
CREATE OR REPLACE FUNCTION public.check_feature_access(p_user_id uuid, p_feature_key text, p_org_id uuid, p_requested numeric)
 RETURNS jsonb
 LANGUAGE plpgsql
 STABLE
AS $function$
DECLARE
    sub        record;
    feature    plan_features%ROWTYPE;
    lim        record;
    counted    record;
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
    SELECT * INTO lim FROM effective_limit(p_org_id, p_feature_key);
    SELECT * INTO counted
    FROM limit_period_usage(p_org_id, p_feature_key, (now() AT TIME ZONE sub.timezone)::date);
    -- exact numbers: no trailing zeros of a division (7, not 7.0000000000000000)
    used := trim_scale(counted.used);
    IF lim.limit_value = -1 THEN
        RETURN jsonb_build_object('feature_key', p_feature_key, 'plan', sub.plan, 'limit', -1,
                                  'unlimited', true, 'used', used, 'remaining', NULL,
                                  'requested', p_requested, 'allowed', true,
                                  'period', counted.period,
                                  'period_start', counted.period_start,
                                  'period_end', counted.period_end, 'soft', lim.soft,
                                  'source', lim.source);
    END IF;
    remaining := greatest(lim.limit_value - used, 0);
    RETURN jsonb_build_object('feature_key', p_feature_key, 'plan', sub.plan,
                              'limit', lim.limit_value, 'unlimited', false, 'used', used,
                              'remaining', remaining, 'requested', p_requested,
                              'allowed', lim.soft OR used + p_requested <= lim.limit_value,
                              'period', counted.period, 'period_start', counted.period_start,
                              'period_end', counted.period_end, 'soft', lim.soft,
                              'source', lim.source, 'thresholds', to_jsonb(lim.thresholds))
           || CASE WHEN lim.soft
                   THEN jsonb_build_object('overage',
                                           greatest(used + p_requested - lim.limit_value, 0))
                   ELSE '{}'::jsonb END;
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
-- honoured only in the service's own session, i.e. a login that is a member of the role
-- owning the tables (migration 014). Generated here with that role's name as a literal:
-- looking the owner up in pg_class inside the function (and a SET clause, which stops the
-- planner inlining it) made every access check cost 1.0 instead of 0.26 ms, evaluated in
-- each statement under RLS. Re-applied by every `metering migrate`, so it follows the owner.
DO $generate$
BEGIN
    EXECUTE format($template$
CREATE OR REPLACE FUNCTION public.metering_scoped_org()
 RETURNS uuid
 LANGUAGE sql
 STABLE
AS $function$
    SELECT CASE
        WHEN pg_has_role(session_user, %L::name, 'MEMBER')
        THEN nullif(current_setting('metering.org_id', true), '')::uuid
    END
$function$
$template$, (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'public.usage_events'::regclass));
END;
$generate$;

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

-- Trigger (migration 020): a plan changed, so every limit of the organization is checked
-- again by the next aggregation pass (a lower limit may be crossed already).
CREATE OR REPLACE FUNCTION public.recheck_limits_after_plan_change()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO limit_rechecks (org_id, feature_key)
    SELECT NEW.org_id, pf.feature_key FROM plan_features pf
    WHERE pf.plan = NEW.plan AND pf.limit_value IS NOT NULL
    ON CONFLICT (org_id, feature_key) DO UPDATE SET requested_at = now();
    RETURN NULL;
END;
$function$;
