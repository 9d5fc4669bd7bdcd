-- Privacy and compliance (issue 23: src/stripe_platform/compliance/, docs/compliance.md): the
-- schema for data-subject requests, consent, breaches and the daily control results. Owned by the
-- NOLOGIN role PrivacyAdmin, as keys/access/audit are: these tables name data subjects and what
-- was done to their data, so Admin, Developer and ReadOnlyUser get no USAGE here; the platform's
-- service role reaches it by membership. The tables come in the migrations after this one.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'privacyadmin') THEN
        CREATE ROLE PrivacyAdmin NOLOGIN;
    END IF;
    IF NOT pg_has_role(current_user, 'privacyadmin', 'USAGE') THEN
        EXECUTE format('GRANT PrivacyAdmin TO %I', current_user);
    END IF;
END
$$;

CREATE SCHEMA privacy AUTHORIZATION PrivacyAdmin;
REVOKE ALL ON SCHEMA privacy FROM PUBLIC;
