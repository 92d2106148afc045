-- Meters as data (contract v2 section 2, issue 37). Before this migration the seven event
-- types of v1 were the only ones, fixed in event_types and in the code.
--
-- * `meters`: one row per meter, immutable but for its description and status. The seven
--   v1 types become seeded meters (`builtin`): the v1 tables and functions keep counting
--   them, unchanged, into usage_aggregations. Every other meter is counted by the meter
--   pass (aggregator/schema/60_meters.sql) into meter_aggregations.
-- * The meters are counted by a pass of their own, on a watermark of their own
--   (aggregator_state 'meters', starting where the v1 one stands), so that meters defined
--   by users never delay the seeded meters' numbers and crossings.
-- * `counted_from_xid`: the `lower` bound of the first meter pass that saw the meter; the
--   meter passes count events from there on, the backfill everything below. Set by that
--   pass in its own transaction, so the hand-over cannot miss or double an event.
-- * A change of the table notifies channel `metering_meters`: running consumers and API
--   processes reload the set of accepted event types at once (metering/meters/registry.py).

CREATE TABLE meters (
    key               text PRIMARY KEY CHECK (key ~ '^[a-z][a-z0-9_]{0,62}$'),
    event_type        text NOT NULL CHECK (event_type ~ '^[a-z][a-z0-9_.]{0,63}$'),
    aggregation       text NOT NULL CHECK (aggregation IN
                          ('sum', 'count', 'max', 'latest', 'unique_count', 'time_weighted')),
    value             text NOT NULL,          -- 'quantity', 'user_id' or 'metadata.<path>'
    filter            jsonb NOT NULL DEFAULT '[]',   -- [{"path": [...], "values": [...]}]
    -- the filter as documents one of which the metadata must contain (@>): every
    -- combination of one value per path (metering.meters.definition); NULL: no filter
    filter_docs       jsonb[],
    group_by          text[] NOT NULL DEFAULT '{}' CHECK (cardinality(group_by) <= 3),
    limit_key         text,
    limit_scope       text CHECK (limit_scope IN ('period', 'lifetime')),
    limit_unit        numeric NOT NULL DEFAULT 1 CHECK (limit_unit >= 1),
    description       text NOT NULL DEFAULT '',
    status            text NOT NULL DEFAULT 'backfilling'
                          CHECK (status IN ('backfilling', 'active', 'archived')),
    builtin           boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    created_by        text,
    archived_at       timestamptz,
    counted_from_xid  bigint,
    -- the backfill walks the events below counted_from_xid in (org_id, occurred_at) order:
    -- every event at or before this position is counted; how many of its type it read
    backfill_total    bigint,
    backfill_read     bigint NOT NULL DEFAULT 0,
    backfill_after_org uuid,
    backfill_after_at timestamptz,
    backfilled_at     timestamptz,
    CHECK ((limit_key IS NULL) = (limit_scope IS NULL))
);
-- One meter counts against a limit at a time.
CREATE UNIQUE INDEX meters_one_per_limit ON meters (limit_key)
    WHERE limit_key IS NOT NULL AND status <> 'archived';
CREATE INDEX meters_by_type ON meters (event_type) WHERE status <> 'archived';

INSERT INTO meters (key, event_type, aggregation, value, limit_key, limit_scope, limit_unit,
                    description, status, builtin, backfilled_at)
SELECT event_type, event_type,
       CASE aggregation WHEN 'sum' THEN 'sum' WHEN 'gauge_latest' THEN 'latest'
                        ELSE 'unique_count' END,
       CASE aggregation WHEN 'distinct_users' THEN 'user_id' ELSE 'quantity' END,
       limit_key, CASE WHEN lifetime THEN 'lifetime' ELSE 'period' END, limit_unit,
       description, 'active', true, now()
FROM event_types;

-- Usage of the meters that are not builtin, per period and dimension values.
CREATE TABLE meter_aggregations (
    org_id        uuid    NOT NULL,
    -- no foreign key to meters: meters are never deleted, and the check cost ~30 us for
    -- each row a pass writes (2 s of a pass over 5,000 events read by 13 meters)
    meter_key     text    NOT NULL,
    dimensions    jsonb   NOT NULL DEFAULT '{}',
    period        text    NOT NULL CHECK (period IN ('day', 'month')),
    period_start  date    NOT NULL,            -- in the organization's time zone
    value         numeric NOT NULL,
    event_count   bigint  NOT NULL,
    latest_at     timestamptz,                 -- latest: occurred_at of the reading in value
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, meter_key, period, period_start, dimensions)
);
-- unique_count: the values seen per period (exact; a month is not the sum of its days).
CREATE TABLE meter_unique_values (
    org_id        uuid NOT NULL,
    meter_key     text NOT NULL,
    dimensions    jsonb NOT NULL,
    period        text NOT NULL,
    period_start  date NOT NULL,
    value         text NOT NULL,
    PRIMARY KEY (org_id, meter_key, period, period_start, dimensions, value)
);
-- time_weighted: the readings (one per instant; on equal times the larger value). The value
-- of a window is computed from them when it is read: for a period not over yet it grows
-- with the clock, so a stored number would be stale the moment it was written.
CREATE TABLE meter_readings (
    org_id       uuid NOT NULL,
    meter_key    text NOT NULL,
    dimensions   jsonb NOT NULL,
    occurred_at  timestamptz NOT NULL,
    value        numeric NOT NULL,
    PRIMARY KEY (org_id, meter_key, dimensions, occurred_at)
);
-- Events a meter read the type of but could not read (metering_meter_skipped_total).
CREATE TABLE meter_skips (
    meter_key  text NOT NULL,
    reason     text NOT NULL,
    events     bigint NOT NULL,
    PRIMARY KEY (meter_key, reason)
);
-- Notifications about meters (meter.backfilled), kept for the webhooks to deliver.
CREATE TABLE meter_notifications (
    id          uuid PRIMARY KEY,
    kind        text NOT NULL,
    meter_key   text NOT NULL REFERENCES meters (key),
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The API reads usage as metering_reader scoped to one organization (migration 014); the
-- usage queries computed from raw events count those below the aggregator's watermark.
GRANT SELECT ON meters TO metering_writer, metering_reader;
GRANT SELECT ON meter_aggregations, meter_unique_values, meter_readings TO metering_reader;
GRANT SELECT (name, watermark_xid) ON aggregator_state TO metering_reader;
ALTER TABLE meter_aggregations ENABLE ROW LEVEL SECURITY;
ALTER TABLE meter_unique_values ENABLE ROW LEVEL SECURITY;
ALTER TABLE meter_readings ENABLE ROW LEVEL SECURITY;
CREATE POLICY reader_own_org ON meter_aggregations FOR SELECT TO metering_reader
    USING (org_id = metering_scoped_org());
CREATE POLICY reader_own_org ON meter_unique_values FOR SELECT TO metering_reader
    USING (org_id = metering_scoped_org());
CREATE POLICY reader_own_org ON meter_readings FOR SELECT TO metering_reader
    USING (org_id = metering_scoped_org());

INSERT INTO aggregator_state (name, watermark_xid)
SELECT 'meters', watermark_xid FROM aggregator_state WHERE name = 'usage';

-- The trigger's function is defined in metering/schema/60_meters.sql, applied after this
-- file by the same `metering migrate`; this placeholder stands in until then.
CREATE FUNCTION notify_meters_changed() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;

CREATE TRIGGER meters_changed
AFTER INSERT OR UPDATE OR DELETE ON meters
FOR EACH STATEMENT EXECUTE FUNCTION notify_meters_changed();
