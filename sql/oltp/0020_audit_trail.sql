-- The sealed audit trail (issue 22, audit/trail.py, docs/audit.md). Per stream ("postgres", "api",
-- "audit", ...) every record is chained to the one before it:
--     hash = sha256(prev_hash || frame(stream) || frame(seq) || frame(at) || frame(kind)
--                              || frame(source_key) || frame(payload))
-- where frame(x) = 4-byte big-endian length of x's UTF-8 bytes, then those bytes; seq in decimal,
-- at as UTC 'YYYY-MM-DDTHH:MM:SS.ffffffZ', payload the canonical JSON text stored as is (sorted
-- keys, no spaces). The first record of a stream has prev_hash = 32 zero bytes. Signed
-- checkpoints (Ed25519) pin (stream, seq, hash) so a chain rewritten or cut at its tail is caught.
--
-- Like the key store (0012) and access control (0015), the schema belongs to a NOLOGIN role,
-- AuditAdmin, which the platform's service role (the one running migrations) is a member of;
-- Admin, Developer and ReadOnlyUser get no USAGE. The records, checkpoints and signing keys are
-- append-only for everyone, the owner included; the only way a record leaves is
-- audit.remove_expired(), the retention job's function, which needs a signed retention
-- checkpoint at the cut first and records the cut. A superuser can bypass triggers: that is what
-- `stripe-platform audit verify` is for.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'auditadmin') THEN
        CREATE ROLE AuditAdmin NOLOGIN;
    END IF;
    IF NOT pg_has_role(current_user, 'auditadmin', 'USAGE') THEN
        EXECUTE format('GRANT AuditAdmin TO %I', current_user);
    END IF;
END
$$;

CREATE SCHEMA audit AUTHORIZATION AuditAdmin;
REVOKE ALL ON SCHEMA audit FROM PUBLIC;

CREATE TABLE audit.trail_record (
    stream text NOT NULL CHECK (stream ~ '^[a-z][a-z0-9_]{0,62}$'),
    seq bigint NOT NULL CHECK (seq > 0),
    at timestamptz NOT NULL,
    kind text NOT NULL CHECK (kind <> ''),
    -- What the record came from (e.g. "postgres:<file>:<offset>"): a re-collection is skipped.
    source_key text NOT NULL CHECK (source_key <> ''),
    -- Canonical JSON text, exactly the bytes hashed (jsonb would re-serialise it).
    payload text NOT NULL CHECK (left(payload, 1) = '{'),
    prev_hash bytea NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash bytea NOT NULL CHECK (octet_length(hash) = 32),
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (stream, seq),
    UNIQUE (stream, source_key)
);
CREATE INDEX trail_record_at ON audit.trail_record (stream, at);

-- For readers: the payload as jsonb.
CREATE VIEW audit.trail AS
    SELECT stream, seq, at, kind, source_key, payload::jsonb AS payload, prev_hash, hash,
           recorded_at
    FROM audit.trail_record;

-- The head of each stream: the last seq and hash, locked by an append (one writer a stream at a
-- time). Not evidence (it is mutable): verify trusts only the records and signed checkpoints, and
-- reports a head beyond the last record as a truncation.
CREATE TABLE audit.trail_head (
    stream text PRIMARY KEY CHECK (stream ~ '^[a-z][a-z0-9_]{0,62}$'),
    seq bigint NOT NULL DEFAULT 0 CHECK (seq >= 0),
    hash bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000'
        CHECK (octet_length(hash) = 32),
    checkpoint_seq bigint NOT NULL DEFAULT 0 CHECK (checkpoint_seq >= 0),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The checkpoint signing keys: the public key in clear (verify needs no secret), the private key
-- wrapped by the Envelope (scope postgres/audit_signing, associated data binding it to this
-- public key), so a key row an intruder adds cannot be made to look like the platform's.
CREATE TABLE audit.signing_key (
    key_id text PRIMARY KEY CHECK (key_id ~ '^ed25519:[0-9a-f]{16}$'),
    public_key bytea NOT NULL UNIQUE CHECK (octet_length(public_key) = 32),
    wrapped_private bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Signed (stream, seq, hash): 'periodic' (every audit_checkpoint_records records, and `audit
-- checkpoint`), or 'retention' (the anchor of a stream's new start after a retention cut).
CREATE TABLE audit.trail_checkpoint (
    stream text NOT NULL,
    seq bigint NOT NULL CHECK (seq >= 0),
    hash bytea NOT NULL CHECK (octet_length(hash) = 32),
    kind text NOT NULL CHECK (kind IN ('periodic', 'retention')),
    signed_at timestamptz NOT NULL,
    -- No foreign key: its check needs UPDATE on signing_key, which nobody holds; verify names an
    -- unknown key_id.
    key_id text NOT NULL,
    signature bytea NOT NULL CHECK (octet_length(signature) = 64),
    PRIMARY KEY (stream, kind, seq)
);

-- Every retention cut (what audit.remove_expired removed), besides the retention record the job
-- appends to the "audit" stream.
CREATE TABLE audit.trail_cut (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream text NOT NULL,
    through_seq bigint NOT NULL CHECK (through_seq > 0),
    cutoff timestamptz NOT NULL,
    removed bigint NOT NULL CHECK (removed >= 0),
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    db_user text NOT NULL DEFAULT session_user
);

-- UPDATE and TRUNCATE always refused; DELETE only of the rows remove_expired() is removing in
-- this transaction (it sets the transaction-local audit.cut_* settings).
CREATE FUNCTION audit.reject_trail_mutation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_LEVEL = 'ROW'
       AND OLD.stream = current_setting('audit.cut_stream', true)
       AND OLD.seq <= nullif(current_setting('audit.cut_through', true), '')::bigint THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit.% is append-only: % rejected', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'expired records leave only through the retention job (audit retention)';
END
$$;

CREATE TRIGGER trail_record_append_only BEFORE UPDATE OR DELETE ON audit.trail_record
    FOR EACH ROW EXECUTE FUNCTION audit.reject_trail_mutation();
CREATE TRIGGER trail_record_no_truncate BEFORE TRUNCATE ON audit.trail_record
    FOR EACH STATEMENT EXECUTE FUNCTION public.reject_audit_mutation();
CREATE TRIGGER trail_checkpoint_append_only BEFORE UPDATE OR DELETE ON audit.trail_checkpoint
    FOR EACH ROW EXECUTE FUNCTION public.reject_audit_mutation();
CREATE TRIGGER trail_checkpoint_no_truncate BEFORE TRUNCATE ON audit.trail_checkpoint
    FOR EACH STATEMENT EXECUTE FUNCTION public.reject_audit_mutation();
CREATE TRIGGER signing_key_append_only BEFORE UPDATE OR DELETE ON audit.signing_key
    FOR EACH ROW EXECUTE FUNCTION public.reject_audit_mutation();
CREATE TRIGGER signing_key_no_truncate BEFORE TRUNCATE ON audit.signing_key
    FOR EACH STATEMENT EXECUTE FUNCTION public.reject_audit_mutation();
CREATE TRIGGER trail_cut_append_only BEFORE UPDATE OR DELETE ON audit.trail_cut
    FOR EACH ROW EXECUTE FUNCTION public.reject_audit_mutation();
CREATE TRIGGER trail_cut_no_truncate BEFORE TRUNCATE ON audit.trail_cut
    FOR EACH STATEMENT EXECUTE FUNCTION public.reject_audit_mutation();

-- The retention job's only way to remove records: a prefix of the stream (seq <= p_through), all
-- older than p_cutoff, anchored first by a signed 'retention' checkpoint at p_through.
CREATE FUNCTION audit.remove_expired(p_stream text, p_through bigint, p_cutoff timestamptz)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    removed bigint;
BEGIN
    IF p_cutoff > clock_timestamp() THEN
        RAISE EXCEPTION 'retention cutoff % is in the future', p_cutoff;
    END IF;
    IF EXISTS (SELECT FROM audit.trail_record
               WHERE stream = p_stream AND seq <= p_through AND at >= p_cutoff) THEN
        RAISE EXCEPTION 'stream %: a record at or before seq % is not older than %',
            p_stream, p_through, p_cutoff;
    END IF;
    IF NOT EXISTS (SELECT FROM audit.trail_checkpoint
                   WHERE stream = p_stream AND kind = 'retention' AND seq = p_through) THEN
        RAISE EXCEPTION 'stream %: no signed retention checkpoint at seq %', p_stream, p_through;
    END IF;
    PERFORM set_config('audit.cut_stream', p_stream, true);
    PERFORM set_config('audit.cut_through', p_through::text, true);
    DELETE FROM audit.trail_record WHERE stream = p_stream AND seq <= p_through;
    GET DIAGNOSTICS removed = ROW_COUNT;
    PERFORM set_config('audit.cut_stream', '', true);
    PERFORM set_config('audit.cut_through', '', true);
    INSERT INTO audit.trail_cut (stream, through_seq, cutoff, removed)
        VALUES (p_stream, p_through, p_cutoff, removed);
    RETURN removed;
END
$$;

ALTER TABLE audit.trail_record OWNER TO AuditAdmin;
ALTER VIEW audit.trail OWNER TO AuditAdmin;
ALTER TABLE audit.trail_head OWNER TO AuditAdmin;
ALTER TABLE audit.signing_key OWNER TO AuditAdmin;
ALTER TABLE audit.trail_checkpoint OWNER TO AuditAdmin;
ALTER TABLE audit.trail_cut OWNER TO AuditAdmin;
ALTER FUNCTION audit.reject_trail_mutation() OWNER TO AuditAdmin;
ALTER FUNCTION audit.remove_expired(text, bigint, timestamptz) OWNER TO AuditAdmin;
REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA audit FROM PUBLIC;
REVOKE ALL ON FUNCTION audit.remove_expired(text, bigint, timestamptz) FROM PUBLIC;
-- The owner keeps DELETE on the records only for remove_expired (SECURITY DEFINER), which the
-- trigger lets through; nothing else of the evidence can be changed or removed.
REVOKE UPDATE, TRUNCATE ON audit.trail_record FROM PUBLIC, AuditAdmin;
REVOKE UPDATE, DELETE, TRUNCATE ON audit.trail_checkpoint, audit.signing_key, audit.trail_cut
    FROM PUBLIC, AuditAdmin;
REVOKE ALL ON SCHEMA audit FROM Admin, Developer, ReadOnlyUser;
REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM Admin, Developer, ReadOnlyUser;
