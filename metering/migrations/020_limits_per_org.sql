-- Limits shaped per organization (contract v2 section 8, issue 39). Before this migration
-- every limit was its plan's, hard, with thresholds fixed at 80 and 100 for everyone.
--
-- * plan_features.thresholds: the percentages a plan's limit notifies (default 80, 100).
-- * org_limit_overrides: an organization's own limit for a feature (enterprise contracts),
--   taking precedence over its plan's row: the limit (-1 unlimited), `soft` (never refuses;
--   the access check reports the overage) and its own thresholds (NULL: the plan's).
-- * limit_rechecks: a limit whose definition changed for an organization (an override set
--   or removed, a plan changed); the next aggregation pass checks it against the usage it
--   has, so lowering a limit mid-period notifies the thresholds now crossed, once.
-- The one definition of which limit applies is effective_limit (metering/schema/50_limits.sql).

CREATE FUNCTION valid_thresholds(thresholds int[]) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT thresholds IS NULL
        OR (cardinality(thresholds) BETWEEN 1 AND 10
            AND array_position(thresholds, NULL) IS NULL
            AND 1 <= ALL (thresholds) AND 1000 >= ALL (thresholds))
$$;

ALTER TABLE plan_features
    ADD COLUMN thresholds int[] NOT NULL DEFAULT '{80,100}' CHECK (valid_thresholds(thresholds));

CREATE TABLE org_limit_overrides (
    org_id       uuid NOT NULL,
    feature_key  text NOT NULL CHECK (feature_key <> 'features'),
    -- -1 means unlimited and is never compared as a number
    limit_value  bigint NOT NULL CHECK (limit_value >= -1),
    soft         boolean NOT NULL DEFAULT false,
    thresholds   int[] CHECK (valid_thresholds(thresholds)),   -- NULL: the plan's
    updated_at   timestamptz NOT NULL DEFAULT now(),
    updated_by   text,
    PRIMARY KEY (org_id, feature_key)
);

CREATE TABLE limit_rechecks (
    org_id        uuid NOT NULL,
    feature_key   text NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, feature_key)
);

-- The access check runs as metering_reader scoped to one organization (migration 014).
GRANT SELECT ON org_limit_overrides TO metering_reader;
ALTER TABLE org_limit_overrides ENABLE ROW LEVEL SECURITY;
CREATE POLICY reader_own_org ON org_limit_overrides FOR SELECT TO metering_reader
    USING (org_id = metering_scoped_org());

-- A plan change re-checks the organization's limits (trigger function in 50_limits.sql).
CREATE FUNCTION recheck_limits_after_plan_change() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE TRIGGER org_subscriptions_plan_changed AFTER UPDATE OF plan ON org_subscriptions
FOR EACH ROW WHEN (OLD.plan IS DISTINCT FROM NEW.plan)
EXECUTE FUNCTION recheck_limits_after_plan_change();

-- The limit check now reads each limit's own thresholds: new result types.
DROP FUNCTION IF EXISTS aggregation_pass(bigint, bigint, integer[]);
DROP FUNCTION IF EXISTS meter_pass(bigint, bigint, integer[]);
DROP FUNCTION IF EXISTS touched_limit_usage(uuid[], text[], date[], numeric[], integer[]);
