-- Data-subject requests (issue 23 §1: compliance/requests.py, compliance/stores.py,
-- docs/compliance.md): access, rectify, erase and opt-out requests with their legal clock, the
-- plan each was executed under and the state of each store step; legal holds that stop an
-- erasure; the tombstones of erased subjects, which the downstream steps and pipelines read.
-- In the privacy schema of 0023 (owned by the NOLOGIN role PrivacyAdmin): no data role reads it.
--
-- Nothing personal is stored here in clear: a request names its subject by customer id only; the
-- subject's identifiers (gathered before an erasure, for the downstream steps) and the corrections
-- of a rectification are encrypted under the subject's own key (SubjectKeys, keys.subject_key),
-- so the erasure's final crypto-shredding makes this copy unreadable too.

CREATE TABLE privacy.request (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('access', 'rectify', 'erase', 'opt_out')),
    -- No foreign key: an erased customer stays as a tombstone, and a refused request may name a
    -- customer that never existed.
    customer_id bigint NOT NULL,
    law text NOT NULL CHECK (law IN ('gdpr', 'ccpa')),
    state text NOT NULL DEFAULT 'received'
        CHECK (state IN ('received', 'running', 'done', 'failed', 'refused', 'on_hold')),
    received_at timestamptz NOT NULL,
    due_at timestamptz NOT NULL CHECK (due_at > received_at),
    requested_by text NOT NULL CHECK (requested_by <> ''),
    source text NOT NULL CHECK (source IN ('cli', 'api')),
    identity text NOT NULL,  -- how the requester's identity was verified ("sso+mfa", "cli+otp")
    changes bytea,  -- rectify: the corrections (JSON), encrypted under the subject's key
    identifiers bytea,  -- erase: the subject's identifiers (JSON), encrypted under the subject's key
    plan jsonb,  -- the steps and, per store, what the catalog made it touch (+ the catalog digest)
    steps jsonb NOT NULL DEFAULT '[]',  -- [{store, state, counts, detail, finished_at}] in order
    export_path text,  -- access: the JSON export (mode 0600 under the platform home)
    error text,  -- why refused, on hold or failed (which step)
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    CHECK ((state IN ('done', 'refused')) = (finished_at IS NOT NULL)),
    CHECK (state NOT IN ('failed', 'refused', 'on_hold') OR error IS NOT NULL)
);
-- A duplicate: one open request of a kind per subject (open: not done, not refused).
CREATE UNIQUE INDEX request_open_kind ON privacy.request (customer_id, kind)
    WHERE state NOT IN ('done', 'refused');
CREATE INDEX request_state_due ON privacy.request (state, due_at);

-- Legal holds (litigation, an investigation): an erasure of a subject under hold ends on_hold and
-- erases nothing until the hold is released. History kept: at most one active hold per subject.
CREATE TABLE privacy.legal_hold (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id bigint NOT NULL,
    reason text NOT NULL CHECK (reason <> ''),
    placed_by text NOT NULL CHECK (placed_by <> ''),
    placed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    released_by text,
    released_at timestamptz,
    CHECK ((released_at IS NULL) = (released_by IS NULL))
);
CREATE UNIQUE INDEX legal_hold_active ON privacy.legal_hold (customer_id)
    WHERE released_at IS NULL;

-- Erased subjects (written by the PostgreSQL step of an erasure): the downstream steps and the
-- pipelines exclude or tombstone these customer ids; the customer row itself stays, stripped of
-- identity, because the financial records the law keeps still reference it.
CREATE TABLE privacy.erased_subject (
    customer_id bigint PRIMARY KEY,
    request_id bigint NOT NULL REFERENCES privacy.request (id),
    erased_at timestamptz NOT NULL
);

ALTER TABLE privacy.request OWNER TO PrivacyAdmin;
ALTER TABLE privacy.legal_hold OWNER TO PrivacyAdmin;
ALTER TABLE privacy.erased_subject OWNER TO PrivacyAdmin;
