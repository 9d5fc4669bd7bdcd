-- Access control's own state (issue 21, docs/access.md): the API's SSO sessions and bearer tokens,
-- the SAML replay cache, the MFA factors. Like the key store (0012), it is separate from data access:
-- the schema belongs to the NOLOGIN role AccessAdmin, which the platform's service role (the one
-- running migrations, and the API) is a member of; Admin, Developer and ReadOnlyUser get no USAGE.
-- The tables themselves come in the migrations that follow (0016 sessions, 0017 MFA).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'accessadmin') THEN
        CREATE ROLE AccessAdmin NOLOGIN;
    END IF;
    IF NOT pg_has_role(current_user, 'accessadmin', 'USAGE') THEN
        EXECUTE format('GRANT AccessAdmin TO %I', current_user);
    END IF;
END
$$;

CREATE SCHEMA access AUTHORIZATION AccessAdmin;
REVOKE ALL ON SCHEMA access FROM PUBLIC;
