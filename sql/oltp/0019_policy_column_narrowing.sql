-- The access policy drives the column narrowing (issue 21, docs/access.md).
--
-- Until now apply_column_privileges() (0005, 0011) narrowed Developer and ReadOnlyUser, named in its
-- body. The policy (access/policy.yaml) now says which data classes each role reads in clear, and
-- `stripe-platform access apply` writes that here as column labels (PII, PCI, QUASI, SECRET, NONE);
-- the function, still run after every migration and partition change, narrows every role listed to
-- the columns whose label it may read. The rows below are the default policy's, so a migrated
-- database matches it before any apply (tests/test_access_postgres.py checks: zero drift).

-- Marker role: its members are the logins `access apply` made for the policy's users (a user who
-- left the policy is found by it and dropped).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'access_policy_user') THEN
        CREATE ROLE access_policy_user NOLOGIN;
    END IF;
END
$$;

CREATE TABLE access.column_clear (
    role name PRIMARY KEY,
    labels text[] NOT NULL CHECK (labels <@ ARRAY['PCI', 'PII', 'QUASI', 'SECRET', 'NONE'])
);
COMMENT ON TABLE access.column_clear IS
    'Written by `stripe-platform access apply` from the access policy: the column labels each '
    'role reads in clear; apply_column_privileges() narrows each role to them.';
ALTER TABLE access.column_clear OWNER TO AccessAdmin;
REVOKE ALL ON access.column_clear FROM PUBLIC;

INSERT INTO access.column_clear (role, labels) VALUES
    ('admin', ARRAY['PCI', 'PII', 'QUASI', 'SECRET', 'NONE']),
    ('developer', ARRAY['NONE']),
    ('readonlyuser', ARRAY['NONE']);

-- A role narrowed on a table gives up its table-wide SELECT, INSERT, UPDATE and REFERENCES there
-- for the same privilege on its visible columns; it never gains a privilege it did not hold (the
-- version it replaces granted Developer and ReadOnlyUser column privileges on every such table).
-- Partitions, read directly, take their root's labels. A column without a label counts as NONE
-- (the classification gate, `stripe-platform catalog check`, keeps sql/oltp fully labelled).
CREATE OR REPLACE FUNCTION apply_column_privileges() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t record;
    p text;
    visible text;
    narrowed integer := 0;
BEGIN
    FOR t IN
        SELECT c.oid, n.nspname, c.relname, r.role, coalesce(pg_partition_root(c.oid), c.oid) AS root,
               r.labels
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN access.column_clear r
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'keys', 'access')
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND EXISTS (SELECT FROM pg_roles WHERE rolname = r.role)
    LOOP
        SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO visible
        FROM pg_attribute a
        WHERE a.attrelid = t.root AND a.attnum > 0 AND NOT a.attisdropped
          AND coalesce(substring(col_description(t.root, a.attnum) FROM '^([A-Z]+):'), 'NONE')
              = ANY (t.labels);
        IF NOT EXISTS (
            SELECT FROM pg_attribute a
            WHERE a.attrelid = t.root AND a.attnum > 0 AND NOT a.attisdropped
              AND coalesce(substring(col_description(t.root, a.attnum) FROM '^([A-Z]+):'), 'NONE')
                  <> ALL (t.labels)
        ) THEN
            CONTINUE;
        END IF;
        FOR p IN
            SELECT a.privilege_type
            FROM pg_class c, aclexplode(c.relacl) a
            WHERE c.oid = t.oid AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = t.role)
              AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES')
        LOOP
            EXECUTE format('REVOKE %s ON %I.%I FROM %I', p, t.nspname, t.relname, t.role);
            IF visible IS NOT NULL THEN
                EXECUTE format('GRANT %s (%s) ON %I.%I TO %I',
                               p, visible, t.nspname, t.relname, t.role);
            END IF;
            narrowed := narrowed + 1;
        END LOOP;
    END LOOP;
    RETURN narrowed;
END
$$;

-- The administrators' rules cover the tables created later in platform and archive too (public
-- has had this since 0005).
ALTER DEFAULT PRIVILEGES IN SCHEMA platform GRANT ALL PRIVILEGES ON TABLES TO Admin;
ALTER DEFAULT PRIVILEGES IN SCHEMA archive GRANT ALL PRIVILEGES ON TABLES TO Admin;

SELECT apply_column_privileges();
