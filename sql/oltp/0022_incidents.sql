-- Security incidents (issue 22, audit/incidents.py, docs/audit.md): what the detection rules, the
-- log anomaly model and a failed trail verification found, grouped and tracked to resolution.
-- In the audit schema of 0020 (owned by the NOLOGIN role AuditAdmin; no USAGE for Admin,
-- Developer or ReadOnlyUser): incidents name users, addresses and evidence.
--
-- One incident per dedup key while it is not resolved (open or acknowledged): a later finding
-- with the same key is grouped into it (count, last_seen, evidence appended, severity raised if
-- the new one is higher). A resolved incident stays as it was; a new finding opens a new one.

CREATE TABLE audit.incident (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dedup_key text NOT NULL CHECK (dedup_key <> ''),
    rule text NOT NULL CHECK (rule <> ''),
    title text NOT NULL,
    severity text NOT NULL CHECK (severity IN ('low', 'medium', 'high', 'critical')),
    status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'acknowledged', 'resolved')),
    user_name text,
    source text,
    first_seen timestamptz NOT NULL,
    last_seen timestamptz NOT NULL CHECK (last_seen >= first_seen),
    count int NOT NULL DEFAULT 1 CHECK (count > 0),
    -- Log document ids ("<id>") and trail records ("trail:<stream>:<seq>"), each once, in order
    -- of arrival.
    evidence text[] NOT NULL DEFAULT '{}',
    detail jsonb NOT NULL DEFAULT '{}',  -- the latest finding's detail
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    acknowledged_at timestamptz,
    acknowledged_by text,
    ack_note text,
    resolved_at timestamptz,
    resolved_by text,
    resolve_note text,
    CHECK (CASE status
               WHEN 'open' THEN acknowledged_at IS NULL AND resolved_at IS NULL
               WHEN 'acknowledged' THEN acknowledged_at IS NOT NULL AND resolved_at IS NULL
               ELSE resolved_at IS NOT NULL
           END),
    CHECK ((acknowledged_at IS NULL) = (acknowledged_by IS NULL)),
    CHECK ((resolved_at IS NULL) = (resolved_by IS NULL))
);
-- The grouping rule itself: at most one unresolved incident per key.
CREATE UNIQUE INDEX incident_unresolved_key ON audit.incident (dedup_key)
    WHERE status <> 'resolved';
CREATE INDEX incident_status_severity ON audit.incident (status, severity);
CREATE INDEX incident_last_seen ON audit.incident (last_seen);
CREATE INDEX incident_resolved_key ON audit.incident (dedup_key) WHERE status = 'resolved';

ALTER TABLE audit.incident OWNER TO AuditAdmin;
