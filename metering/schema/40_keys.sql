-- Repeatable definitions (see metering/storage/migrations.py): the one current text of
-- these functions. Edit here; `metering migrate` re-applies the definitions when one changes.
--
-- API keys (migrations 004 and 019).

-- A key changed or was deleted (revoked): tell every API process, which drops it from its
-- cache of authenticated keys (metering/storage/keys.py). The payload is the key's prefix.
CREATE OR REPLACE FUNCTION public.notify_api_key_changed()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM pg_notify('metering_keys',
                      CASE TG_OP WHEN 'DELETE' THEN OLD.prefix ELSE NEW.prefix END);
    RETURN NULL;
END;
$function$;
