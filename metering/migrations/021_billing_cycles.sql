-- Billing cycles (contract v2 section 8, issue 39). Before this migration every period-
-- scoped limit ran per calendar month.
--
-- * org_subscriptions.billing_anchor: with one, period-scoped limits, their usage and their
--   crossings run per cycle, from the anchor's day of month to the same day the next month
--   (an anchor on the 31st falls on the last day of shorter months), in the organization's
--   zone. NULL (the default): calendar months, as before.
-- * A cycle's usage is read from the day rows (whole local days, so DST-correct), exactly:
--   sums and counts add, max and latest take the day rows' own, distinct values come from
--   the per-day sets (usage_period_users, meter_unique_values). See usage_in_cycle in
--   metering/schema/50_limits.sql.
-- * Crossings of a cycle are recorded with period 'cycle' and the cycle's first day.

ALTER TABLE org_subscriptions ADD COLUMN billing_anchor date;

ALTER TABLE limit_notifications DROP CONSTRAINT limit_notifications_period_check;
ALTER TABLE limit_notifications ADD CONSTRAINT limit_notifications_period_check
    CHECK (period IN ('month', 'lifetime', 'cycle'));

-- effective_limit and billing_cycle became table functions, which the planner inlines:
-- their return types changed.
DROP FUNCTION IF EXISTS effective_limit(uuid, text);
DROP FUNCTION IF EXISTS billing_cycle(date, date);
