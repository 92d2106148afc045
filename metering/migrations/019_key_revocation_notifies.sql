-- Key revocation at once (issue 39, item 6). Before this migration an API process kept an
-- authenticated key for up to 2 s, so a revoked key still worked that long. Now a change of
-- api_keys notifies channel `metering_keys` with the key's prefix, and every API process
-- drops that key from its cache as the notification arrives (metering/storage/keys.py).

-- The trigger's function is defined in metering/schema/40_keys.sql, applied after this
-- file by the same `metering migrate`; this placeholder stands in until then.
CREATE FUNCTION notify_api_key_changed() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;

CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE ON api_keys
FOR EACH ROW EXECUTE FUNCTION notify_api_key_changed();
