-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Meters (contract section 2, migration 016): what a meter reads from an event, in SQL.
-- The plain-Python statement of the same rules is metering/meters/definition.py
-- (`read_event`); tests hold the two to each other.

-- Tell every listener (consumers, API processes) that the set of meters changed.
CREATE OR REPLACE FUNCTION public.notify_meters_changed()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM pg_notify('metering_meters', '');
    RETURN NULL;
END;
$function$;

-- A value path's number: a JSON number, or a string in plain decimal notation (no spaces,
-- NaN or Infinity, an exponent of at most three digits); NULL for anything else.
CREATE OR REPLACE FUNCTION public.meter_number(v jsonb)
 RETURNS numeric
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
    SELECT CASE jsonb_typeof(v)
        WHEN 'number' THEN (v #>> '{}')::numeric
        WHEN 'string' THEN CASE
            WHEN length(v #>> '{}') <= 100
             AND (v #>> '{}') ~ '^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$'
            THEN (v #>> '{}')::numeric END
    END
$function$;

-- Whether an event's metadata passes a meter's filter: every path holds one of its values
-- (JSON equality: 1 and 1.0 are equal, "1" and 1 are not).
CREATE OR REPLACE FUNCTION public.meter_filter_passes(metadata jsonb, filter jsonb)
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
    SELECT NOT EXISTS (
        SELECT 1 FROM jsonb_array_elements(filter) f
        WHERE NOT coalesce(
            (metadata #> ARRAY(SELECT jsonb_array_elements_text(f -> 'path')))
                IN (SELECT jsonb_array_elements(f -> 'values')),
            false)
    )
$function$;

-- An event's dimensions for a meter's group_by: {"path": text or null, ...}.
CREATE OR REPLACE FUNCTION public.meter_dimensions(metadata jsonb, group_by text[])
 RETURNS jsonb
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
    SELECT coalesce(jsonb_object_agg(g.path, metadata #>> string_to_array(g.path, '.')),
                    '{}'::jsonb)
    FROM unnest(group_by) AS g (path)
$function$;
