-- Extensions, the brief's roles, and the PII helpers every later table uses.

CREATE EXTENSION IF NOT EXISTS pgcrypto;

-- The brief's roles (RBAC). Roles are cluster-wide, so they are created only when missing.
-- They are group roles (NOLOGIN): people log in as their own roles and are granted one of these.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'admin') THEN
        CREATE ROLE Admin NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'developer') THEN
        CREATE ROLE Developer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'readonlyuser') THEN
        CREATE ROLE ReadOnlyUser NOLOGIN;
    END IF;
    -- Marker role: members are contractors/projects with access that expires (VALID UNTIL).
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'temporary_access') THEN
        CREATE ROLE temporary_access NOLOGIN;
    END IF;
END
$$;

-- Detached (retired) Transaction partitions are kept here, readable by admin only.
CREATE SCHEMA IF NOT EXISTS archive;

-- Personal data is encrypted with a key the application passes in the session's startup options
-- (-c stripe.pii_key=...). Holding the key is separate from holding SELECT on the columns.
CREATE FUNCTION pii_key() RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    k text := current_setting('stripe.pii_key', true);
BEGIN
    IF k IS NULL OR length(k) < 32 THEN
        RAISE EXCEPTION 'no PII key in this session'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'connect through stripe-platform, which passes -c stripe.pii_key=...';
    END IF;
    RETURN k;
END
$$;

-- s2k-mode=1 (salted, not iterated): the key is random and long, so password-style key stretching
-- adds nothing but cost (~25x slower per value).
CREATE FUNCTION pii_encrypt(plain text) RETURNS bytea
LANGUAGE sql STRICT VOLATILE
RETURN pgp_sym_encrypt(plain, pii_key(), 'cipher-algo=aes256, compress-algo=0, s2k-mode=1');

CREATE FUNCTION pii_decrypt(cipher bytea) RETURNS text
LANGUAGE sql STRICT STABLE
RETURN pgp_sym_decrypt(cipher, pii_key());

-- Deterministic keyed hash so encrypted values (email) can still be looked up by equality.
CREATE FUNCTION pii_lookup_hash(plain text) RETURNS bytea
LANGUAGE sql STRICT STABLE
RETURN hmac(lower(btrim(plain)), pii_key(), 'sha256');

-- Keeps UpdatedAt honest for incremental extraction (cursor field).
CREATE FUNCTION touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.UpdatedAt := CURRENT_TIMESTAMP;
    RETURN NEW;
END
$$;
