-- Key management (security/envelope.py, docs/security.md): wrapped data keys, per-subject keys for
-- crypto-shredding, and the key audit trail. Key access is separate from data access (the brief):
-- the schema belongs to the NOLOGIN role KeyAdmin, which the platform's own service role is a
-- member of; Admin, Developer and ReadOnlyUser get no USAGE on it, whatever they hold on the data.
-- Nothing here is key material in clear: data keys are stored wrapped by their store's key-encryption
-- key (which lives in the key provider), subject keys wrapped by the `subjects/_wrap` data key.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'keyadmin') THEN
        CREATE ROLE KeyAdmin NOLOGIN;
    END IF;
    -- The role running the migrations is the platform's service role: it uses the keys.
    IF NOT pg_has_role(current_user, 'keyadmin', 'USAGE') THEN
        EXECUTE format('GRANT KeyAdmin TO %I', current_user);
    END IF;
END
$$;

CREATE SCHEMA keys AUTHORIZATION KeyAdmin;
REVOKE ALL ON SCHEMA keys FROM PUBLIC;

-- One row a data-key version. `scope` is <store>/<table> (e.g. postgres/customer); `purpose`
-- separates the encryption keys (rotated) from the keyed-hash lookup keys (never rotated: a lookup
-- hash must stay findable). Exactly one current version per scope and purpose; older versions
-- ('previous') still decrypt until retired after re-encryption left nothing under them.
CREATE TABLE keys.data_key (
    scope text NOT NULL
        CHECK (scope ~ '^(postgres|documents|lake|warehouse|subjects)(/[A-Za-z0-9_.-]+)+$'),
    purpose text NOT NULL DEFAULT 'encrypt' CHECK (purpose IN ('encrypt', 'lookup')),
    version integer NOT NULL CHECK (version > 0),
    kek_id text NOT NULL,
    kek_version integer NOT NULL CHECK (kek_version > 0),
    wrapped bytea NOT NULL,
    state text NOT NULL DEFAULT 'current' CHECK (state IN ('current', 'previous', 'retired')),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    rewrapped_at timestamptz,
    retired_at timestamptz,
    PRIMARY KEY (scope, purpose, version),
    CHECK ((state = 'retired') = (retired_at IS NOT NULL))
);
CREATE UNIQUE INDEX data_key_one_current ON keys.data_key (scope, purpose) WHERE state = 'current';
CREATE INDEX data_key_kek ON keys.data_key (kek_id, kek_version);

-- One key a data subject (customer id), wrapped locally under a version of `subjects/_wrap`.
-- Shredding destroys the wrapped key (the row stays as a tombstone: no new key is ever made for an
-- erased subject, and the erasure stays provable).
CREATE TABLE keys.subject_key (
    subject_id bigint PRIMARY KEY,
    version integer NOT NULL DEFAULT 1 CHECK (version > 0),
    wrap_version integer,
    wrapped bytea,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    shredded_at timestamptz,
    CHECK ((wrapped IS NULL) = (shredded_at IS NOT NULL)),
    CHECK ((wrapped IS NULL) = (wrap_version IS NULL))
);

-- Every key operation, failures included (who, from where, what, on which key, how it ended).
CREATE TABLE keys.key_event (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor text NOT NULL,
    db_user text NOT NULL DEFAULT session_user,
    source_address inet DEFAULT inet_client_addr(),
    operation text NOT NULL,
    scope text,
    version integer,
    outcome text NOT NULL CHECK (outcome IN ('ok', 'refused', 'failed')),
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX key_event_at ON keys.key_event (at);

-- Append-only for everyone, the owner and superusers included (reject_audit_mutation: 0004).
CREATE TRIGGER key_event_append_only BEFORE UPDATE OR DELETE ON keys.key_event
    FOR EACH ROW EXECUTE FUNCTION public.reject_audit_mutation();
CREATE TRIGGER key_event_no_truncate BEFORE TRUNCATE ON keys.key_event
    FOR EACH STATEMENT EXECUTE FUNCTION public.reject_audit_mutation();

ALTER TABLE keys.data_key OWNER TO KeyAdmin;
ALTER TABLE keys.subject_key OWNER TO KeyAdmin;
ALTER TABLE keys.key_event OWNER TO KeyAdmin;
REVOKE ALL ON ALL TABLES IN SCHEMA keys FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA keys FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON keys.key_event FROM PUBLIC, KeyAdmin;
-- Explicit, so a later blanket grant cannot slip through unnoticed: data roles hold nothing here.
REVOKE ALL ON SCHEMA keys FROM Admin, Developer, ReadOnlyUser;
REVOKE ALL ON ALL TABLES IN SCHEMA keys FROM Admin, Developer, ReadOnlyUser;
