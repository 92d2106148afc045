-- Webhooks (contract v2 section 9, issue 39): endpoints, the outbox of deliveries and the
-- log of attempts. A delivery row per (message, endpoint) is written by the triggers below
-- in the same transaction that records the crossing (limit_notifications) or the meter
-- notification (meter_notifications): nothing recorded can be missed by the webhooks, and
-- a delivery survives restarts of every process (the outbox the crossings already use for
-- Kafka). The deliverer (metering/webhooks/deliverer.py) sends them.

CREATE TABLE webhook_endpoints (
    id           uuid PRIMARY KEY,
    url          text NOT NULL,
    org_id       uuid,                         -- NULL: every organization's messages
    types        text[] NOT NULL CHECK (cardinality(types) > 0
                     AND types <@ ARRAY['limit.crossed', 'meter.backfilled']),
    description  text NOT NULL DEFAULT '',
    -- the signing secret (whsec_...): kept, since every message is signed with it
    secret       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text,
    deleted_at   timestamptz
);

CREATE TABLE webhook_deliveries (
    id                bigserial PRIMARY KEY,
    endpoint_id       uuid NOT NULL REFERENCES webhook_endpoints (id),
    message_id        text NOT NULL,          -- the webhook-id: the same on every attempt
    type              text NOT NULL,
    org_id            uuid,
    body              text NOT NULL,          -- the exact bytes signed and sent
    created_at        timestamptz NOT NULL DEFAULT now(),
    status            text NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts          int NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    first_attempt_at  timestamptz,
    delivered_at      timestamptz,
    last_error        text,
    UNIQUE (endpoint_id, message_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id),
    attempt      int NOT NULL,
    started_at   timestamptz NOT NULL,
    status_code  int,
    latency_ms   double precision NOT NULL,
    error        text,
    PRIMARY KEY (delivery_id, attempt)
);

-- The triggers' functions are defined in metering/schema/70_webhooks.sql, applied after
-- this file by the same `metering migrate`; these placeholders stand in until then.
CREATE FUNCTION enqueue_limit_crossed() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE FUNCTION enqueue_meter_notification() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;

CREATE TRIGGER limit_crossed_webhooks AFTER INSERT ON limit_notifications
FOR EACH ROW EXECUTE FUNCTION enqueue_limit_crossed();
CREATE TRIGGER meter_notification_webhooks AFTER INSERT ON meter_notifications
FOR EACH ROW EXECUTE FUNCTION enqueue_meter_notification();
