-- The key generation that keyed sessions compare (oltp/db.py) names the database too: a database
-- dropped and created again under the same name has new keys, even where its list of key
-- versions and states reads the same as the old one's.
CREATE OR REPLACE FUNCTION pii_keyring_generation() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN md5((SELECT oid::text FROM pg_database WHERE datname = current_database())
           || '|' || coalesce((SELECT string_agg(format('%s/%s/%s/%s', scope, purpose, version, state), ','
                                                ORDER BY scope, purpose, version)
                               FROM keys.data_key WHERE scope LIKE 'postgres/%'), '')
           || coalesce((SELECT max(retired_at)::text FROM keys.legacy_key_retired), ''));
ALTER FUNCTION pii_keyring_generation() OWNER TO KeyAdmin;
