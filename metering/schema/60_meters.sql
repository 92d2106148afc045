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

-- An event's dimensions for a meter's group_by: {"path": text or null, ...}. A plain
-- expression (no subquery), and STABLE as jsonb_build_object is, so that the planner
-- inlines it into the statements that read events: called as a function it cost 9-13 us
-- per event, inlined about 1 us.
CREATE OR REPLACE FUNCTION public.meter_dimensions(metadata jsonb, group_by text[])
 RETURNS jsonb
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$
    SELECT CASE cardinality(group_by)
        WHEN 0 THEN '{}'::jsonb
        WHEN 1 THEN jsonb_build_object(
            group_by[1], metadata #>> string_to_array(group_by[1], '.'))
        WHEN 2 THEN jsonb_build_object(
            group_by[1], metadata #>> string_to_array(group_by[1], '.'),
            group_by[2], metadata #>> string_to_array(group_by[2], '.'))
        ELSE jsonb_build_object(
            group_by[1], metadata #>> string_to_array(group_by[1], '.'),
            group_by[2], metadata #>> string_to_array(group_by[2], '.'),
            group_by[3], metadata #>> string_to_array(group_by[3], '.'))
    END
$function$;

-- Whether a dimension value of an event is over 128 characters (the meter skips it):
-- a plain expression too, as meter_dimensions.
CREATE OR REPLACE FUNCTION public.meter_dimension_too_long(metadata jsonb, group_by text[])
 RETURNS boolean
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
    SELECT cardinality(group_by) > 0 AND (
        coalesce(length(metadata #>> string_to_array(group_by[1], '.')), 0) > 128
        OR coalesce(length(metadata #>> string_to_array(group_by[2], '.')), 0) > 128
        OR coalesce(length(metadata #>> string_to_array(group_by[3], '.')), 0) > 128)
$function$;
