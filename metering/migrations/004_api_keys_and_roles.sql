-- API keys (only hashes stored), least-privilege roles, row-level security by organization.

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    prefix      text NOT NULL UNIQUE,          -- public part, shown in `keys list`
    secret_hash bytea NOT NULL,                -- sha256 of the whole key; the key is never stored
    scopes      text[] NOT NULL CHECK (scopes <@ ARRAY['ingest', 'read', 'admin'] AND cardinality(scopes) > 0),
    org_id      uuid,                          -- NULL: any organization
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Roles. They are cluster-wide, so they are created only when missing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'metering_writer') THEN
        CREATE ROLE metering_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'metering_reader') THEN
        CREATE ROLE metering_reader NOLOGIN;
    END IF;
END;
$$;

-- The consumer: inserts events and dedupe keys, gives new orgs the free plan; nothing else.
GRANT USAGE ON SCHEMA public TO metering_writer, metering_reader;
GRANT SELECT, INSERT ON usage_events, usage_event_ids TO metering_writer;
GRANT SELECT, INSERT ON org_subscriptions TO metering_writer;
GRANT SELECT ON event_types TO metering_writer;
-- Creating monthly partitions needs ownership of usage_events: the function runs as its owner.
ALTER FUNCTION ensure_usage_event_partitions(date, date) SECURITY DEFINER SET search_path = public;
REVOKE ALL ON FUNCTION ensure_usage_event_partitions(date, date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ensure_usage_event_partitions(date, date) TO metering_writer;

-- The API's read path: reads only, and only its organization's rows (policies below).
GRANT SELECT ON usage_aggregations, usage_period_users, usage_events, org_subscriptions,
               plan_features, plans, event_types TO metering_reader;

-- Row-level security: a session of these roles sees the rows of the organization in the
-- setting metering.org_id (set per request by the API), and none when it is not set.
ALTER TABLE usage_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_aggregations ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_period_users ENABLE ROW LEVEL SECURITY;
ALTER TABLE org_subscriptions ENABLE ROW LEVEL SECURITY;

CREATE POLICY reader_own_org ON usage_events FOR SELECT TO metering_reader
    USING (org_id = nullif(current_setting('metering.org_id', true), '')::uuid);
CREATE POLICY reader_own_org ON usage_aggregations FOR SELECT TO metering_reader
    USING (org_id = nullif(current_setting('metering.org_id', true), '')::uuid);
CREATE POLICY reader_own_org ON usage_period_users FOR SELECT TO metering_reader
    USING (org_id = nullif(current_setting('metering.org_id', true), '')::uuid);
CREATE POLICY reader_own_org ON org_subscriptions FOR SELECT TO metering_reader
    USING (org_id = nullif(current_setting('metering.org_id', true), '')::uuid);
-- The writer stores events of every organization (the consumer serves all of them).
CREATE POLICY writer_all ON usage_events FOR ALL TO metering_writer USING (true) WITH CHECK (true);
CREATE POLICY writer_all ON org_subscriptions FOR ALL TO metering_writer USING (true) WITH CHECK (true);

-- The API's access check in one round trip: become the reader role and scope the session
-- to one organization for this transaction only, then check. Returns NULL for a feature
-- key no plan has. SECURITY INVOKER (the default): the role switch and RLS apply inside.
CREATE FUNCTION reader_check_feature_access(p_org_id uuid, p_feature_key text, p_requested numeric)
RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('role', 'metering_reader', true);
    PERFORM set_config('metering.org_id', p_org_id::text, true);
    IF NOT EXISTS (SELECT 1 FROM plan_features WHERE feature_key = p_feature_key) THEN
        RETURN NULL;
    END IF;
    RETURN check_feature_access(NULL, p_feature_key, p_org_id, p_requested);
END;
$$;
