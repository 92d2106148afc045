-- Corrections (contract v2 section 10, issue 40). Before this migration a wrong event could
-- only be fixed by SQL by hand.
--
-- * A cancelled event stays in usage_events (its id stays claimed in usage_event_ids, so
--   the same (org_id, id) is never counted again), marked with when, by whom and why, and
--   with the id of the cancelling transaction (`cancel_xid`). The aggregator's passes read
--   the cancellations of the transactions in their range, as they read new events, and
--   recount the periods each cancelled event was in (aggregator/schema/40_aggregation.sql,
--   65_meter_pass.sql). Every count reads the events below a bound (its watermark) and
--   leaves out those cancelled below the same bound, so a number always says "the events
--   stored and not cancelled before transaction X" and `reconcile` can prove it.
-- * `audit_log`: who cancelled, replayed or imported what, and when.

ALTER TABLE usage_events
    ADD COLUMN cancelled_at   timestamptz,
    ADD COLUMN cancelled_by   text,
    ADD COLUMN cancel_reason  text,
    ADD COLUMN cancel_xid     bigint;
-- the passes find the cancellations of their range here (a few rows, never the events)
CREATE INDEX usage_events_cancel_xid ON usage_events (cancel_xid) WHERE cancel_xid IS NOT NULL;

CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,           -- 'key:<prefix> (<name>)' or 'cli:<os user>'
    action    text NOT NULL,           -- events.cancel, dlq.replay, import, ...
    org_id    uuid,
    details   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at);

-- Signatures of unreleased definitions changed by this issue (the cancellation bound):
-- the repeatable files define the new ones after this file.
DROP FUNCTION IF EXISTS count_meter_events(text[], bigint, bigint, timestamptz, timestamptz,
                                           uuid, text[], uuid, timestamptz, uuid, timestamptz);
DROP FUNCTION IF EXISTS meter_event_readings(text[], uuid, bigint, bigint, timestamptz,
                                             timestamptz, uuid, timestamptz, uuid, timestamptz);
