-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Retention: drops whole monthly partitions of raw events older than a horizon, and their
-- dedupe keys; aggregates are kept (billing history). The lateness-window guard is in
-- metering.storage.retention (the window is configuration).

CREATE OR REPLACE FUNCTION public.apply_retention(p_keep_from timestamp with time zone, p_dry_run boolean DEFAULT false)
 RETURNS TABLE(partition_name text, range_start timestamp with time zone, range_end timestamp with time zone, events bigint)
 LANGUAGE plpgsql
AS $function$
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
$function$;
