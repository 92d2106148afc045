-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- Monthly partitions of usage_events. The owner creates any range; the consumer
-- (metering_writer) only the months around the database's today (migration 014).

-- Creates the monthly partitions between two months (inclusive), moving rows the default
-- partition holds for them; returns how many were created. Owner only.
CREATE OR REPLACE FUNCTION public.ensure_usage_event_partitions(from_month date, to_month date)
 RETURNS integer
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
DECLARE
    month    date := date_trunc('month', from_month)::date;
    last     date := date_trunc('month', to_month)::date;
    name     text;
    created  int := 0;
BEGIN
    WHILE month <= last LOOP
        name := format('usage_events_%s', to_char(month, 'YYYY_MM'));
        IF to_regclass(format('public.%I', name)) IS NULL THEN
            EXECUTE format('CREATE TABLE public.%I (LIKE public.usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS) '
                           'WITH (autovacuum_vacuum_insert_scale_factor = 2, '
                           'autovacuum_vacuum_insert_threshold = 100000)', name);
            EXECUTE format(
                'WITH moved AS (DELETE FROM public.usage_events_default WHERE occurred_at >= %L AND occurred_at < %L RETURNING *) '
                'INSERT INTO public.%I SELECT * FROM moved', month, (month + interval '1 month')::date, name);
            EXECUTE format('ALTER TABLE public.usage_events ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                           name, month, (month + interval '1 month')::date);
            created := created + 1;
        END IF;
        month := (month + interval '1 month')::date;
    END LOOP;
    RETURN created;
END;
$function$;

-- Two months back to two ahead of now(): all the writer may ask for. Runs as the owner.
CREATE OR REPLACE FUNCTION public.ensure_usage_event_partitions_around_today()
 RETURNS integer
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    SELECT public.ensure_usage_event_partitions((now() - interval '2 months')::date,
                                                (now() + interval '2 months')::date)
$function$;

REVOKE ALL ON FUNCTION ensure_usage_event_partitions(date, date) FROM PUBLIC, metering_writer;
REVOKE ALL ON FUNCTION ensure_usage_event_partitions_around_today() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ensure_usage_event_partitions_around_today() TO metering_writer;
