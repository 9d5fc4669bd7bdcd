-- SAML single sign-on's replay protection (issue 21, security/saml.py, docs/access.md). The API is
-- a SAML service provider: it answers only responses to AuthnRequests it sent itself, each once,
-- and uses each IdP assertion once. Both are kept here rather than in a process's memory, so any
-- API worker accepts the answer to a request another one sent, and a replay is refused across
-- workers and restarts. Rows expire (security/saml.py deletes them as it goes): past their expiry
-- a request or an assertion is refused on its age anyway.

-- One AuthnRequest the API sent (GET /saml/login).
CREATE TABLE access.saml_request (
    request_id text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 256),
    -- Where the browser goes after the login: a same-origin path, checked before it is stored.
    next_path text NOT NULL CHECK (next_path ~ '^/([^/\\]|$)'),
    -- sha256 hex of the random cookie of the browser that asked: the response must come back
    -- through that browser (a response injected into another browser is refused).
    browser_sha256 text NOT NULL CHECK (browser_sha256 ~ '^[0-9a-f]{64}$'),
    source_ip inet,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz NOT NULL,
    -- Set once, by the one response accepted for it; a second response to it is a replay.
    answered_at timestamptz,
    assertion_id text,
    CHECK (expires_at > created_at),
    CHECK ((answered_at IS NULL) = (assertion_id IS NULL))
);
CREATE INDEX saml_request_expiry ON access.saml_request (expires_at);

-- One assertion the API accepted: never accepted again.
CREATE TABLE access.saml_assertion (
    assertion_id text PRIMARY KEY CHECK (length(assertion_id) BETWEEN 1 AND 256),
    issuer text NOT NULL,
    request_id text NOT NULL,
    user_name text NOT NULL,
    consumed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- When the assertion itself stops being valid (its NotOnOrAfter, plus the clock skew allowed):
    -- after that it is refused for its age, and its row may go.
    expires_at timestamptz NOT NULL
);
CREATE INDEX saml_assertion_expiry ON access.saml_assertion (expires_at);

ALTER TABLE access.saml_request OWNER TO AccessAdmin;
ALTER TABLE access.saml_assertion OWNER TO AccessAdmin;
REVOKE ALL ON access.saml_request, access.saml_assertion FROM PUBLIC;
-- Explicit, so a later blanket grant cannot slip through unnoticed: data roles hold nothing here.
REVOKE ALL ON access.saml_request, access.saml_assertion FROM Admin, Developer, ReadOnlyUser;
