-- The API's credentials (issue 21, security/sessions.py, docs/access.md): SSO sessions (the
-- `sp_session` cookie) and bearer tokens for machines. Only SHA-256 digests of the random secrets
-- (secrets.token_urlsafe(32), 256 bits) are kept: a copy of these tables lets nobody in. Roles are
-- not trusted from here alone: at each request the API intersects them with what the access policy
-- grants the user at that moment, so a policy change or an expiry takes effect at once.

CREATE TABLE access.api_session (
    -- sha256 hex of the cookie's token: the session's id in logs and in the MFA step-up.
    session_id text PRIMARY KEY CHECK (session_id ~ '^[0-9a-f]{64}$'),
    user_name text NOT NULL CHECK (user_name <> ''),
    roles text[] NOT NULL CHECK (cardinality(roles) > 0),
    -- The IdP groups at login (NULL: the session did not come with groups).
    idp_groups text[],
    via text NOT NULL CHECK (via ~ '^[a-z][a-z0-9_]*$'),
    source_ip inet,
    idp_session_index text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    mfa_verified_at timestamptz,
    revoked_at timestamptz,
    revoked_reason text,
    CHECK (expires_at > created_at),
    CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);
CREATE INDEX api_session_user ON access.api_session (user_name);
CREATE INDEX api_session_open ON access.api_session (expires_at) WHERE revoked_at IS NULL;

CREATE TABLE access.api_token (
    -- Shown to people (lists, logs, `access token revoke`); the secret never is after issuing.
    token_id text PRIMARY KEY CHECK (token_id ~ '^tok_[0-9a-f]{12}$'),
    secret_sha256 text NOT NULL UNIQUE CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    user_name text NOT NULL CHECK (user_name <> ''),
    -- The most the token may use: at request time, only those the policy still grants the user.
    roles text[] NOT NULL CHECK (cardinality(roles) > 0),
    created_by text NOT NULL CHECK (created_by <> ''),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz NOT NULL,
    last_used_at timestamptz,
    revoked_at timestamptz,
    revoked_by text,
    revoked_reason text,
    CHECK (expires_at > created_at),
    CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);
CREATE INDEX api_token_user ON access.api_token (user_name);

ALTER TABLE access.api_session OWNER TO AccessAdmin;
ALTER TABLE access.api_token OWNER TO AccessAdmin;
REVOKE ALL ON access.api_session, access.api_token FROM PUBLIC;
-- Explicit, so a later blanket grant cannot slip through unnoticed: data roles hold nothing here.
REVOKE ALL ON access.api_session, access.api_token FROM Admin, Developer, ReadOnlyUser;
