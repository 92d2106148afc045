-- Database roles as defence in depth (issue 42, item 10). Before this migration:
-- * a session of metering_reader read any organization by setting metering.org_id itself,
--   or through reader_check_feature_access(other_org, ...);
-- * metering_writer could insert a first subscription on any plan (enterprise included);
-- * ensure_usage_event_partitions (SECURITY DEFINER) searched pg_temp first, so a writer's
--   temporary table named like a month's partition made it skip that month, and it created
--   any range of partitions a writer asked for.
--
-- The functions themselves, and their grants, are defined once, in metering/schema/
-- (20_partitions.sql: the partition functions; 50_limits.sql: metering_scoped_org and the
-- access check), which `metering migrate` applies after this file.

-- 1. The organization scope of the reader role is honoured only in the service's own
--    session (metering_scoped_org). The policies need the function to exist: this
--    placeholder scopes to nothing until 50_limits.sql replaces it in the same migrate.
CREATE FUNCTION metering_scoped_org() RETURNS uuid
LANGUAGE sql STABLE AS $$ SELECT NULL::uuid $$;

ALTER POLICY reader_own_org ON usage_events USING (org_id = metering_scoped_org());
ALTER POLICY reader_own_org ON usage_aggregations USING (org_id = metering_scoped_org());
ALTER POLICY reader_own_org ON usage_period_users USING (org_id = metering_scoped_org());
ALTER POLICY reader_own_org ON org_subscriptions USING (org_id = metering_scoped_org());

-- 2. The writer gives a new organization the defaults (the free plan) and nothing else.
REVOKE INSERT ON org_subscriptions FROM metering_writer;
GRANT INSERT (org_id) ON org_subscriptions TO metering_writer;
