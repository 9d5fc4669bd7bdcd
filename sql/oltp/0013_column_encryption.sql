-- Per-table data keys for the OLTP's encrypted columns (issue 20; security/envelope.py keeps the
-- keys, oltp/db.py hands them to keyed sessions, security/reencrypt.py moves data between versions).
--
-- pgcrypto stays the cipher (pgp_sym_encrypt, AES-256), but every ciphertext now names its key:
--     'SPK1' || scope || ':' || version || ':' || <PGP message>        e.g. SPK1postgres/customer:2:...
-- A ciphertext without the header is LEGACY: written before issue 20 with the one PII key of the
-- keyring file (stripe.pii_key), readable while a session still carries that key.
--
-- What a keyed session carries (startup options, never SET: the statement log would record them):
--     stripe.pii_keys       every usable version of each postgres/* data key: scope:version:base64,...
--     stripe.pii_current    the version new ciphertexts use, per scope: scope:version,...
--     stripe.pii_lookup_key the HMAC key of pii_lookup_hash (base64; never rotated with the DEKs)
--     stripe.pii_key        LEGACY single key, only while legacy ciphertexts may remain
-- The PGP passphrase is the base64 text of the 256-bit data key (salted S2K, as before).

-- The session's key for one version of a scope, NULL when the session does not hold it.
CREATE FUNCTION pii_session_key(scope text, version integer) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    ring text := ',' || coalesce(current_setting('stripe.pii_keys', true), '') || ',';
    tag text := ',' || scope || ':' || version || ':';
    at integer := strpos(ring, tag);
BEGIN
    IF at = 0 THEN
        RETURN NULL;
    END IF;
    RETURN nullif(split_part(substr(ring, at + length(tag)), ',', 1), '');
END
$$;

-- The version of a scope that new ciphertexts use in this session.
CREATE FUNCTION pii_current_version(scope text) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
DECLARE
    current text := ',' || coalesce(current_setting('stripe.pii_current', true), '') || ',';
    tag text := ',' || scope || ':';
    at integer := strpos(current, tag);
BEGIN
    IF at = 0 THEN
        RAISE EXCEPTION 'no key % in this session', scope
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'connect through stripe-platform, which passes the data keys in the '
                         'startup options (postgres/<table> scopes)';
    END IF;
    RETURN split_part(substr(current, at + length(tag)), ',', 1)::integer;
END
$$;

-- Writes never use a retired version: a session opened before a re-encryption ended still holds
-- it, and data written under it after retirement would be unreadable. SECURITY DEFINER: data roles
-- have no access to the keys schema; this tells them one boolean, no key material.
CREATE FUNCTION pii_key_writable(scope text, version integer) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN EXISTS (SELECT FROM keys.data_key d
               WHERE d.scope = $1 AND d.purpose = 'encrypt' AND d.version = $2
                 AND d.state <> 'retired');
ALTER FUNCTION pii_key_writable(text, integer) OWNER TO KeyAdmin;

-- Serialises writers of a scope against the retirement of its old versions (reencrypt.py takes
-- the exclusive side): a writer checks once a transaction, under the shared lock, that its version
-- is not retired; the retirement waits for writers still in flight and re-encrypts what they wrote.
CREATE FUNCTION pii_key_lock_id(scope text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN hashtext('pii_key:' || scope);

-- One argument: the brief's example (sql/examples/customer_insert.sql), the Customer's key.
DROP FUNCTION pii_encrypt(text);
CREATE FUNCTION pii_encrypt(plain text, scope text DEFAULT 'postgres/customer') RETURNS bytea
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    version integer;
    k text;
    tag text;
    checked text;
BEGIN
    IF scope IS NULL OR scope !~ '^postgres/[a-z0-9_]+$' THEN
        RAISE EXCEPTION 'pii_encrypt: scope %, expected postgres/<table>', coalesce(scope, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF plain IS NULL THEN
        RETURN NULL;
    END IF;
    version := pii_current_version(scope);
    k := pii_session_key(scope, version);
    IF k IS NULL THEN
        RAISE EXCEPTION 'no key % v% in this session', scope, version
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    tag := scope || ':' || version;
    checked := coalesce(current_setting('stripe.pii_checked', true), '');
    IF strpos(',' || checked || ',', ',' || tag || ',') = 0 THEN
        PERFORM pg_advisory_xact_lock_shared(pii_key_lock_id(scope));
        IF NOT pii_key_writable(scope, version) THEN
            RAISE EXCEPTION 'key % v% was retired: nothing is written under it', scope, version
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'reconnect: new sessions carry the current version';
        END IF;
        -- Local to the transaction: the next one checks again.
        PERFORM set_config('stripe.pii_checked', checked || ',' || tag, true);
    END IF;
    -- s2k-mode=1 (salted, not iterated): the key is random and long, so password-style key
    -- stretching adds nothing but cost (~25x slower per value).
    RETURN convert_to('SPK1' || tag || ':', 'UTF8')
        || pgp_sym_encrypt(plain, k, 'cipher-algo=aes256, compress-algo=0, s2k-mode=1');
END
$$;

-- The key a ciphertext names: (scope, version), version 0 for a legacy one; NULL for NULL.
CREATE FUNCTION pii_key_ref(cipher bytea, OUT scope text, OUT version integer)
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    head bytea;
    first integer;
    second integer;
BEGIN
    IF substr(cipher, 1, 4) <> 'SPK1'::bytea THEN
        scope := 'legacy';
        version := 0;
        RETURN;
    END IF;
    head := substr(cipher, 5, 80);
    first := position(':'::bytea IN head);
    second := first + position(':'::bytea IN substr(head, first + 1));
    IF first < 2 OR second < first + 2
       OR encode(substr(head, 1, first - 1), 'escape') !~ '^[a-z]+(/[a-z0-9_.-]+)+$'
       OR encode(substr(head, first + 1, second - first - 1), 'escape') !~ '^[1-9][0-9]{0,8}$' THEN
        RAISE EXCEPTION 'not a ciphertext of this platform: malformed SPK1 key header'
            USING ERRCODE = 'data_corrupted';
    END IF;
    scope := encode(substr(head, 1, first - 1), 'escape');
    version := encode(substr(head, first + 1, second - first - 1), 'escape')::integer;
END
$$;

CREATE FUNCTION pii_key_version(cipher bytea) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT
RETURN (pii_key_ref(cipher)).version;

-- Decrypts with the version the header names; legacy ciphertexts with the legacy key. pgcrypto
-- cannot tell a wrong key from altered bytes (its integrity check fails either way): both are
-- reported as such, naming the key.
CREATE OR REPLACE FUNCTION pii_decrypt(cipher bytea) RETURNS text
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    ref record;
    k text;
BEGIN
    ref := pii_key_ref(cipher);
    IF ref.version = 0 THEN
        k := nullif(current_setting('stripe.pii_key', true), '');
        IF k IS NULL THEN
            RAISE EXCEPTION 'no key legacy (the single PII key before per-table keys) in this session'
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'a legacy ciphertext is left: run `stripe-platform keys reencrypt`';
        END IF;
    ELSE
        k := pii_session_key(ref.scope, ref.version);
        IF k IS NULL THEN
            RAISE EXCEPTION 'no key % v% in this session', ref.scope, ref.version
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'connect through stripe-platform, which passes every usable version';
        END IF;
        cipher := substr(cipher, length(ref.scope) + length(ref.version::text) + 7);
    END IF;
    BEGIN
        RETURN pgp_sym_decrypt(cipher, k);
    EXCEPTION WHEN external_routine_invocation_exception THEN
        RAISE EXCEPTION 'ciphertext under key % v% fails its integrity check (tampered, or not '
                        'that key''s): %', ref.scope, ref.version, SQLERRM
            USING ERRCODE = 'data_corrupted';
    END;
END
$$;

-- Deterministic keyed hash so encrypted values (email) can still be looked up by equality. The
-- lookup key is not rotated with the data keys (the hash must stay findable). EmailHash values of
-- the legacy key are recomputed by the re-encryption (with the Email it rewrites): until then a
-- legacy customer is not found by e-mail, so an upgraded database runs `keys reencrypt` first.
CREATE OR REPLACE FUNCTION pii_lookup_hash(plain text) RETURNS bytea
LANGUAGE plpgsql STABLE STRICT AS $$
DECLARE
    k text := nullif(current_setting('stripe.pii_lookup_key', true), '');
BEGIN
    IF k IS NULL THEN
        RAISE EXCEPTION 'no lookup key postgres/customer in this session'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'connect through stripe-platform, which passes the keys';
    END IF;
    RETURN hmac(convert_to(lower(btrim(plain)), 'UTF8'), decode(k, 'base64'), 'sha256');
END
$$;

-- pii_key() was the legacy single key's accessor; nothing reads it any more.
DROP FUNCTION pii_key();

-- Background re-encryption (security/reencrypt.py): where each job stands, so a killed run resumes
-- after the last committed batch. One job a scope and target version.
CREATE TABLE keys.column_reencryption (
    scope text NOT NULL CHECK (scope ~ '^postgres/[a-z0-9_]+$'),
    target_version integer NOT NULL CHECK (target_version > 0),
    last_id bigint,
    rows_rewritten bigint NOT NULL DEFAULT 0,
    batches integer NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    PRIMARY KEY (scope, target_version)
);

-- The legacy single key is retired (no longer handed to sessions) once no legacy ciphertext is
-- left in any encrypted column; then the keyring file <home>/keys/pii.key can be deleted.
CREATE TABLE keys.legacy_key_retired (
    retired_at timestamptz PRIMARY KEY DEFAULT clock_timestamp(),
    actor text NOT NULL
);

ALTER TABLE keys.column_reencryption OWNER TO KeyAdmin;
ALTER TABLE keys.legacy_key_retired OWNER TO KeyAdmin;
REVOKE ALL ON keys.column_reencryption, keys.legacy_key_retired FROM PUBLIC;

-- What keyed sessions carry changes with this value: oltp/db.py reads it in every new keyed session
-- and re-reads the keys only when it moved (a rotation is visible to the next session). SECURITY
-- DEFINER: whoever logs in can read this digest of key versions and states, never a key.
CREATE FUNCTION pii_keyring_generation() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN md5(coalesce((SELECT string_agg(format('%s/%s/%s/%s', scope, purpose, version, state), ','
                                       ORDER BY scope, purpose, version)
                     FROM keys.data_key WHERE scope LIKE 'postgres/%'), '')
           || coalesce((SELECT max(retired_at)::text FROM keys.legacy_key_retired), ''));
ALTER FUNCTION pii_keyring_generation() OWNER TO KeyAdmin;
