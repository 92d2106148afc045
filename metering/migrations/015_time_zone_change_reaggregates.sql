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

-- The trigger's function is defined in aggregator/schema/40_aggregation.sql, applied after
-- this file by the same `metering migrate`; the trigger needs it to exist, so this
-- placeholder (which does nothing) stands in until then.
CREATE FUNCTION reaggregate_org_after_zone_change() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;

CREATE TRIGGER org_zone_changed
AFTER UPDATE OF timezone ON org_subscriptions
FOR EACH ROW WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone)
EXECUTE FUNCTION reaggregate_org_after_zone_change();
