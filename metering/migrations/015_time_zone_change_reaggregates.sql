-- Changing an organization's time zone re-aggregates its retained history in the new zone
-- (issue 42, item 8). Before, the day and month rows stayed in the old zone's calendar while
-- new events were counted in the new one, and `metering reconcile --org` reported
-- differences for every period.
--
-- The rule: after the change, every period of the organization that starts after the
-- retention horizon's day (all of them if retention never ran) is recomputed from the raw
-- events in the new zone, in the same transaction as the change, so no reader sees a mix.
-- Periods before cannot be recomputed (their raw events are gone) and keep the zone they
-- were computed in; the period holding the horizon keeps its row unless retained events
-- fall in it, and then counts only those.
-- Crossings already recorded stay recorded (they were sent). A trigger, so that every path
-- that changes the zone (the API's PUT, an operator's UPDATE) keeps the rule.

CREATE FUNCTION reaggregate_org_after_zone_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    horizon   timestamptz;
    first_at  timestamptz;
    last_at   timestamptz;
    p         text;
BEGIN
    -- the incremental pass holds this lock while it runs: none runs in between
    PERFORM 1 FROM aggregator_state WHERE name = 'usage' FOR UPDATE;
    SELECT raw_events_from INTO horizon FROM retention_state WHERE name = 'usage_events';
    SELECT min(occurred_at), max(occurred_at) INTO first_at, last_at
    FROM usage_events
    WHERE org_id = NEW.org_id AND occurred_at >= coalesce(horizon, '-infinity');
    FOREACH p IN ARRAY ARRAY['day', 'month'] LOOP
        -- the old zone's rows after the horizon's day; aggregate_usage writes the new ones
        DELETE FROM usage_aggregations
        WHERE org_id = NEW.org_id AND period = p
          AND period_start > coalesce((horizon AT TIME ZONE OLD.timezone)::date, '-infinity'::date);
        DELETE FROM usage_period_users
        WHERE org_id = NEW.org_id AND period = p
          AND period_start > coalesce((horizon AT TIME ZONE OLD.timezone)::date, '-infinity'::date);
        IF first_at IS NOT NULL THEN
            PERFORM aggregate_usage(p, first_at, last_at + interval '1 microsecond', NEW.org_id);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE TRIGGER org_zone_changed
AFTER UPDATE OF timezone ON org_subscriptions
FOR EACH ROW WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone)
EXECUTE FUNCTION reaggregate_org_after_zone_change();
