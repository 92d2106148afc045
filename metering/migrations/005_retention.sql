-- Retention of raw events: whole monthly partitions are dropped, never rows deleted one by
-- one. Aggregates are kept (billing history); the horizon is recorded so that a
-- re-aggregation cannot erase aggregates whose raw events are gone.

CREATE TABLE retention_state (
    name             text PRIMARY KEY,
    raw_events_from  timestamptz NOT NULL,
    ran_at           timestamptz NOT NULL DEFAULT now()
);

-- Drops every monthly partition of usage_events that ends at or before p_keep_from (its
-- bounds read from the catalog), the default partition's rows before the kept range, and
-- the dedupe keys whose events can only have been in the dropped range. Returns what it
-- dropped (or, with p_dry_run, what it would drop).
CREATE FUNCTION apply_retention(p_keep_from timestamptz, p_dry_run boolean DEFAULT false)
RETURNS TABLE (partition_name text, range_start timestamptz, range_end timestamptz, events bigint)
LANGUAGE plpgsql AS $$
DECLARE
    part       record;
    kept_from  timestamptz := p_keep_from;
BEGIN
    FOR part IN
        SELECT c.relname,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\)'))[1]::timestamptz AS lower,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_events'::regclass
          AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'
        ORDER BY 2
    LOOP
        IF part.upper <= p_keep_from THEN
            partition_name := part.relname;
            range_start := part.lower;
            range_end := part.upper;
            EXECUTE format('SELECT count(*) FROM %I', part.relname) INTO events;
            IF NOT p_dry_run THEN
                EXECUTE format('DROP TABLE %I', part.relname);
            END IF;
            RETURN NEXT;
        ELSIF part.lower < kept_from THEN
            kept_from := part.lower;  -- the partition straddling the horizon is kept whole
        END IF;
    END LOOP;
    IF NOT p_dry_run THEN
        DELETE FROM usage_events_default WHERE occurred_at < kept_from;
        -- An event's key was first seen at most 5 minutes before its occurred_at (the
        -- future tolerance), so keys seen before kept_from - 5 min belong to dropped events.
        DELETE FROM usage_event_ids WHERE first_seen_at < kept_from - interval '5 minutes';
        -- the pass log (one row per non-empty aggregation pass) follows the same horizon
        DELETE FROM aggregation_passes WHERE finished_at < kept_from;
        INSERT INTO retention_state (name, raw_events_from) VALUES ('usage_events', kept_from)
        ON CONFLICT (name) DO UPDATE SET raw_events_from = greatest(retention_state.raw_events_from,
                                                                    excluded.raw_events_from),
                                         ran_at = now();
    END IF;
END;
$$;
