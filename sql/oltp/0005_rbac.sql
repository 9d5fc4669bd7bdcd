-- RBAC: the brief's grants, narrowed to least privilege.
--   admin        everything in this database
--   developer    read/write application data, but no PII/PCI/SECRET column, no audit rewrites
--   readonlyuser read application data, but no PII/PCI/SECRET column
-- Time-limited access for contractors: `stripe-platform db grant-temporary` (VALID UNTIL).

DO $$
BEGIN
    EXECUTE format('GRANT ALL PRIVILEGES ON DATABASE %I TO Admin', current_database());
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO Developer, ReadOnlyUser',
                   current_database());
END
$$;

REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT ALL ON SCHEMA public, archive TO Admin;
GRANT USAGE ON SCHEMA public TO Developer, ReadOnlyUser;

GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA public TO Admin;
GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA public TO Admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO Developer;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO Developer;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO ReadOnlyUser;

-- The same for tables created later by the migration role.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL PRIVILEGES ON TABLES TO Admin;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL PRIVILEGES ON SEQUENCES TO Admin;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO Developer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO Developer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO ReadOnlyUser;

-- Reference data and the audit trail are not developer-writable.
REVOKE INSERT, UPDATE, DELETE ON TransactionStatus, TransactionStatusTransition FROM Developer;
REVOKE UPDATE, DELETE, TRUNCATE ON TransactionStateChanges FROM PUBLIC, Developer, Admin;

-- Column-level narrowing, driven by the classification in column comments (PII:/PCI:/SECRET:).
-- Re-applied after every migration run and partition change, so new tables and partitions
-- are covered even when default privileges granted them whole.
CREATE FUNCTION apply_column_privileges() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    t record;
    visible text;
    narrowed integer := 0;
BEGIN
    FOR t IN
        SELECT c.oid, n.nspname, c.relname, coalesce(pg_partition_root(c.oid), c.oid) AS root
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
    LOOP
        IF NOT EXISTS (
            SELECT FROM pg_attribute a
            WHERE a.attrelid = t.root AND a.attnum > 0 AND NOT a.attisdropped
              AND col_description(t.root, a.attnum) ~ '^(PII|PCI|SECRET):'
        ) THEN
            CONTINUE;
        END IF;
        SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO visible
        FROM pg_attribute a
        WHERE a.attrelid = t.root AND a.attnum > 0 AND NOT a.attisdropped
          AND coalesce(col_description(t.root, a.attnum), '') !~ '^(PII|PCI|SECRET):';
        EXECUTE format('REVOKE SELECT, INSERT, UPDATE ON %I.%I FROM Developer, ReadOnlyUser',
                       t.nspname, t.relname);
        EXECUTE format('GRANT SELECT (%s) ON %I.%I TO Developer, ReadOnlyUser',
                       visible, t.nspname, t.relname);
        EXECUTE format('GRANT INSERT (%s), UPDATE (%s) ON %I.%I TO Developer',
                       visible, visible, t.nspname, t.relname);
        narrowed := narrowed + 1;
    END LOOP;
    RETURN narrowed;
END
$$;
