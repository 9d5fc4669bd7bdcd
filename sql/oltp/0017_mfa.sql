-- MFA factors (issue 21, security/mfa.py, docs/access.md): one TOTP factor (RFC 6238) a user.
-- Access control's own state, in the schema `access` (0015) that only AccessAdmin (the service role
-- is a member) can use: data roles (Admin, Developer, ReadOnlyUser) cannot read it.
--
-- The shared secret is never stored in clear: `secret` is an Envelope ciphertext (AES-256-GCM,
-- security/envelope.py) under the data key `postgres/mfa_factor`, bound to the user's name as
-- associated data (a secret copied onto another user's row does not decrypt).

CREATE TABLE access.mfa_factor (
    user_name text PRIMARY KEY CHECK (user_name ~ '^\S' AND length(user_name) <= 256),
    -- NULL once an administrator reset the factor: the user enrols again.
    secret bytea,
    enrolled_at timestamptz,
    confirmed_at timestamptz,
    -- Replay protection: the TOTP time step (unix time / 30) of the last accepted code. A code of
    -- that step or an earlier one is refused, even while the verifier's window still accepts it.
    last_step bigint,
    last_verified_at timestamptz,
    -- Consecutive wrong codes; at the policy's max_failures the factor locks until locked_until.
    failures integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    locked_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    reset_at timestamptz,
    reset_by text,
    CHECK ((secret IS NULL) = (enrolled_at IS NULL)),
    CHECK (confirmed_at IS NULL OR secret IS NOT NULL),
    CHECK ((reset_at IS NULL) = (reset_by IS NULL))
);

ALTER TABLE access.mfa_factor OWNER TO AccessAdmin;
REVOKE ALL ON access.mfa_factor FROM PUBLIC;
