-- Personal-data breaches and the daily compliance controls (issue 23: compliance/breach.py,
-- compliance/controls.py, docs/compliance.md). In the privacy schema of 0023 (owned by the NOLOGIN
-- role PrivacyAdmin; no USAGE for Admin, Developer or ReadOnlyUser): a breach names the subjects
-- it affected.

-- A security incident (audit.incident) declared a personal-data breach: GDPR Art. 33's clock runs
-- from the declaration (the controller's awareness) to its deadline; the notification drafted from
-- the incident's evidence and the catalog is tracked to its submission. No foreign key to
-- audit.incident: that schema belongs to AuditAdmin, which PrivacyAdmin is not a member of; the
-- declaration checks the incident exists (audit/incidents.get_incident).
CREATE TABLE privacy.breach (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id bigint NOT NULL UNIQUE,  -- one breach per incident
    declared_at timestamptz NOT NULL,
    declared_by text NOT NULL CHECK (declared_by <> ''),
    deadline timestamptz NOT NULL CHECK (deadline > declared_at),
    state text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'submitted')),
    -- What the evidence and the catalog say was reached: subject ids (customer ids, pseudonymous),
    -- their approximate number, data categories and classes, records, datasets.
    affected jsonb NOT NULL DEFAULT '{}',
    submitted_at timestamptz,
    submitted_by text,
    reference text,  -- the authority's reference for the notification
    -- When check_overdue raised the overdue incident (once per breach).
    overdue_alerted_at timestamptz,
    CHECK ((state = 'submitted') = (submitted_at IS NOT NULL)),
    CHECK ((submitted_at IS NULL) = (submitted_by IS NULL)),
    CHECK ((submitted_at IS NULL) = (reference IS NULL))
);
CREATE INDEX breach_open_deadline ON privacy.breach (deadline) WHERE state = 'open';
ALTER TABLE privacy.breach OWNER TO PrivacyAdmin;

-- One row per control per run: the dashboard reads the latest and the trend.
CREATE TABLE privacy.control_result (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL CHECK (name IN ('encryption_coverage', 'access_policy_drift',
                                       'expired_access', 'retention', 'pci_scope',
                                       'unauthorised_transfers')),
    passed boolean NOT NULL,
    value double precision NOT NULL,
    unit text NOT NULL,
    -- Counts and names (stores, datasets, fields, principals, files), never a sampled value.
    evidence jsonb NOT NULL DEFAULT '{}',
    run_at timestamptz NOT NULL
);
CREATE INDEX control_result_name_run_at ON privacy.control_result (name, run_at DESC);
CREATE INDEX control_result_run_at ON privacy.control_result (run_at);
ALTER TABLE privacy.control_result OWNER TO PrivacyAdmin;
