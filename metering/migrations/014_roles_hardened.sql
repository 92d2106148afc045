-- Database roles as defence in depth (issue 42, item 10). Before this migration:
-- * a session of metering_reader read any organization by setting metering.org_id itself,
--   or through reader_check_feature_access(other_org, ...);
-- * metering_writer could insert a first subscription on any plan (enterprise included);
-- * ensure_usage_event_partitions (SECURITY DEFINER) searched pg_temp first, so a writer's
--   temporary table named like a month's partition made it skip that month, and it created
--   any range of partitions a writer asked for.

-- 1. The organization scope of the reader role is honoured only in a session logged in as
--    (a member of) the owner of the schema's tables: the service's own login, which sets it
--    per request (metering.storage.reads). A login granted metering_reader directly sees no
--    organization's rows whatever it sets. Inlined by the planner (plain SQL, STABLE): an
--    index scan compares with it once, not per row.
CREATE FUNCTION metering_scoped_org() RETURNS uuid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN pg_has_role(session_user,
                         (SELECT relowner FROM pg_class WHERE oid = 'public.usage_events'::regclass),
                         'MEMBER')
        THEN nullif(current_setting('metering.org_id', true), '')::uuid
    END
$$;

ALTER POLICY reader_own_org ON usage_events USING (org_id = metering_scoped_org());
ALTER POLICY reader_own_org ON usage_aggregations USING (org_id = metering_scoped_org());
ALTER POLICY reader_own_org ON usage_period_users USING (org_id = metering_scoped_org());
ALTER POLICY reader_own_org ON org_subscriptions USING (org_id = metering_scoped_org());

-- Only the service (the owner) runs the access check on behalf of an organization.
REVOKE ALL ON FUNCTION reader_check_feature_access(uuid, text, numeric) FROM PUBLIC;

-- 2. The writer gives a new organization the defaults (the free plan) and nothing else.
REVOKE INSERT ON org_subscriptions FROM metering_writer;
GRANT INSERT (org_id) ON org_subscriptions TO metering_writer;

-- 3. Partitions: pg_temp searched last, names qualified; the writer may only ask for the
--    months around today (two back, two ahead); a range is for the owner.
CREATE OR REPLACE FUNCTION ensure_usage_event_partitions(from_month date, to_month date)
RETURNS int
LANGUAGE plpgsql
SET search_path = public, pg_temp AS $$
DECLARE
    month    date := date_trunc('month', from_month)::date;
    last     date := date_trunc('month', to_month)::date;
    name     text;
    created  int := 0;
BEGIN
    WHILE month <= last LOOP
        name := format('usage_events_%s', to_char(month, 'YYYY_MM'));
        IF to_regclass(format('public.%I', name)) IS NULL THEN
            EXECUTE format('CREATE TABLE public.%I (LIKE public.usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
                           'WITH (autovacuum_vacuum_insert_scale_factor = 2, '
                           'autovacuum_vacuum_insert_threshold = 100000)', name);
            EXECUTE format(
                'WITH moved AS (DELETE FROM public.usage_events_default WHERE occurred_at >= %L AND occurred_at < %L RETURNING *) '
                'INSERT INTO public.%I SELECT * FROM moved', month, (month + interval '1 month')::date, name);
            EXECUTE format('ALTER TABLE public.usage_events ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                           name, month, (month + interval '1 month')::date);
            created := created + 1;
        END IF;
        month := (month + interval '1 month')::date;
    END LOOP;
    RETURN created;
END;
$$;
REVOKE ALL ON FUNCTION ensure_usage_event_partitions(date, date) FROM PUBLIC, metering_writer;

CREATE FUNCTION ensure_usage_event_partitions_around_today()
RETURNS int
LANGUAGE sql
SECURITY DEFINER
SET search_path = public, pg_temp AS $$
    SELECT public.ensure_usage_event_partitions((now() - interval '2 months')::date,
                                                (now() + interval '2 months')::date)
$$;
REVOKE ALL ON FUNCTION ensure_usage_event_partitions_around_today() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ensure_usage_event_partitions_around_today() TO metering_writer;
