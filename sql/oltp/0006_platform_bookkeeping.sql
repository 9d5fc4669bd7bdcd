-- The platform's own bookkeeping, apart from business data (admin only).
CREATE SCHEMA IF NOT EXISTS platform;
GRANT USAGE ON SCHEMA platform TO Admin;

-- `stripe-platform seed` commits each batch together with its row here, so an interrupted run
-- resumes after the last committed batch and never loads one twice.
CREATE TABLE platform.seed_run (
    run_key text PRIMARY KEY,
    spec jsonb NOT NULL,
    started_at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    finished_at timestamptz
);
CREATE TABLE platform.seed_batch (
    run_key text NOT NULL REFERENCES platform.seed_run (run_key) ON DELETE CASCADE,
    entity text NOT NULL,
    batch integer NOT NULL,
    rows bigint NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (run_key, entity, batch)
);
GRANT ALL ON ALL TABLES IN SCHEMA platform TO Admin;
