-- The log collector's state (issue 22, audit/collector.py, docs/audit.md), beside the trail it
-- feeds (0020). Everything here is written in the same transaction as the trail records of a
-- batch, so a collector killed at any point resumes exactly where its last commit left it.

-- Per log file: how far it has been read. A file is known by its name and its identity (device,
-- inode, a hash of its first bytes); a file replaced or truncated under the same name gets a new
-- generation, read from its start (its lines' keys name the generation: "<name>~<g>").
CREATE TABLE audit.collector_file (
    source text NOT NULL CHECK (source IN ('postgres', 'api')),
    name text NOT NULL CHECK (name <> '' AND name !~ '[/:]'),
    generation int NOT NULL DEFAULT 1 CHECK (generation > 0),
    device bigint NOT NULL,
    inode bigint NOT NULL,
    head_hash bytea NOT NULL,  -- sha256 of the first min(offset, 4096) bytes read
    "offset" bigint NOT NULL DEFAULT 0 CHECK ("offset" >= 0),
    lines bigint NOT NULL DEFAULT 0 CHECK (lines >= 0),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (source, name)
);

-- Per source: the newest line time seen (a line much older than it is a clock going backwards).
CREATE TABLE audit.collector_source (
    source text PRIMARY KEY CHECK (source IN ('postgres', 'api')),
    high_water timestamptz,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- PostgreSQL sessions whose statements are still being grouped: the Log document their next
-- lines belong to. Removed at the session's disconnection line (or after a week without lines).
CREATE TABLE audit.collector_session (
    session_id text PRIMARY KEY,
    query_id bigint NOT NULL CHECK (query_id >= 0),
    statement_hash bytea,  -- sha256 of the current query's redacted statement
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Lines that could not be collected, kept as read (bytes, not text: a corrupt line may not even be
-- UTF-8) with the reason. Never removed by the collector.
CREATE TABLE audit.collector_quarantine (
    source_key text PRIMARY KEY,  -- "<source>:<file>:<offset>", as a trail record's
    source text NOT NULL,
    reason text NOT NULL CHECK (reason IN ('corrupt', 'truncated', 'unknown_format', 'clock_backwards')),
    detail text NOT NULL,
    line bytea NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX collector_quarantine_reason ON audit.collector_quarantine (reason, quarantined_at);

ALTER TABLE audit.collector_file OWNER TO AuditAdmin;
ALTER TABLE audit.collector_source OWNER TO AuditAdmin;
ALTER TABLE audit.collector_session OWNER TO AuditAdmin;
ALTER TABLE audit.collector_quarantine OWNER TO AuditAdmin;
REVOKE ALL ON audit.collector_file, audit.collector_source, audit.collector_session,
    audit.collector_quarantine FROM PUBLIC;
-- The quarantine is evidence too: kept as written.
REVOKE UPDATE, DELETE, TRUNCATE ON audit.collector_quarantine FROM AuditAdmin;
