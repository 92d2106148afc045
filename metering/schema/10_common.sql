-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Helpers used by tables' defaults, checks and triggers.

-- Trigger function: keeps updated_at current on org_subscriptions.
CREATE OR REPLACE FUNCTION public.set_updated_at()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$function$;

-- Used by the CHECK on org_subscriptions.timezone: an IANA zone PostgreSQL knows.
CREATE OR REPLACE FUNCTION public.is_valid_timezone(name text)
 RETURNS boolean
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
    PERFORM now() AT TIME ZONE name;
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END;
$function$;

-- Used by the CHECKs on plan_features.thresholds and org_limit_overrides.thresholds
-- (migration 020): 1 to 10 percentages, each in 1..1000 (NULL: none given).
CREATE OR REPLACE FUNCTION public.valid_thresholds(thresholds integer[])
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE
AS $function$
    SELECT thresholds IS NULL
        OR (cardinality(thresholds) BETWEEN 1 AND 10
            AND array_position(thresholds, NULL) IS NULL
            AND 1 <= ALL (thresholds) AND 1000 >= ALL (thresholds))
$function$;
