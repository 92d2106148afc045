-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Webhooks (contract section 9, migration 018): the outbox of deliveries, filled in the
-- transaction that records what is delivered.

-- A crossing recorded (limit_notifications): one delivery per endpoint that takes
-- limit.crossed for this organization; the body is the section 3 message as `data`, and
-- the webhook-id the crossing's deterministic id.
CREATE OR REPLACE FUNCTION public.enqueue_limit_crossed()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO webhook_deliveries (endpoint_id, message_id, type, org_id, body)
    SELECT e.id, NEW.id::text, 'limit.crossed', NEW.org_id,
           jsonb_build_object(
               'type', 'limit.crossed',
               'timestamp', NEW.crossed_at,
               'data', jsonb_build_object(
                   'id', NEW.id, 'org_id', NEW.org_id, 'feature_key', NEW.feature_key,
                   'period', NEW.period, 'period_start', NEW.period_start,
                   'threshold_percent', NEW.threshold_percent, 'used', NEW.used,
                   'limit', NEW.limit_value, 'crossed_at', NEW.crossed_at))::text
    FROM webhook_endpoints e
    WHERE e.deleted_at IS NULL AND 'limit.crossed' = ANY (e.types)
      AND (e.org_id IS NULL OR e.org_id = NEW.org_id)
    ON CONFLICT (endpoint_id, message_id) DO NOTHING;
    IF FOUND THEN
        PERFORM pg_notify('metering_webhooks', '');
    END IF;
    RETURN NULL;
END;
$function$;

-- A meter notification recorded (meter.backfilled): to the endpoints that take its kind
-- and are not bound to one organization (a meter is everyone's).
CREATE OR REPLACE FUNCTION public.enqueue_meter_notification()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO webhook_deliveries (endpoint_id, message_id, type, org_id, body)
    SELECT e.id, NEW.id::text, NEW.kind, NULL,
           jsonb_build_object('type', NEW.kind, 'timestamp', NEW.created_at,
                              'data', NEW.payload)::text
    FROM webhook_endpoints e
    WHERE e.deleted_at IS NULL AND NEW.kind = ANY (e.types) AND e.org_id IS NULL
    ON CONFLICT (endpoint_id, message_id) DO NOTHING;
    IF FOUND THEN
        PERFORM pg_notify('metering_webhooks', '');
    END IF;
    RETURN NULL;
END;
$function$;
