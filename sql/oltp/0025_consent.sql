-- The consent registry (issue 23, compliance/consent.py, docs/compliance.md): per data subject and
-- purpose, every consent given or withdrawn, with when and through what (the CLI, the API, a
-- browser's Global Privacy Control signal, a data-subject request, the seed). History is kept:
-- the latest record of a (customer, purpose) wins; the view consent_current is that answer.
--
-- Purposes: analytics, ml_training and marketing are opt-in (GDPR Art. 6(1)(a)/7: no record = no
-- consent); sale is the CCPA right to opt out of the sale or sharing of personal information
-- (1798.120): no record = not opted out, granted = false = opted out (do not sell).
--
-- In the privacy schema of 0023 (owned by the NOLOGIN role PrivacyAdmin; no USAGE for Admin,
-- Developer or ReadOnlyUser): it says which subjects refused what. Pipelines read it from here,
-- the system of record, when they run; no synced copy lags behind a withdrawal.

CREATE TABLE privacy.consent (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- public.Customer.ID; no foreign key: an erased customer's refusal stays on record (proof
    -- that the platform honoured it) and the privacy schema's owner holds no REFERENCES on public.
    customer_id bigint NOT NULL CHECK (customer_id > 0),
    purpose text NOT NULL CHECK (purpose IN ('analytics', 'ml_training', 'marketing', 'sale')),
    granted boolean NOT NULL,
    source text NOT NULL CHECK (source IN ('cli', 'api', 'gpc', 'request', 'seed')),
    -- When the subject gave or withdrew it (the order "latest wins" follows), and who recorded it
    -- (the CLI's OS user, the API caller, "seed").
    recorded_at timestamptz NOT NULL,
    recorded_by text NOT NULL CHECK (recorded_by <> ''),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX consent_latest ON privacy.consent (customer_id, purpose, recorded_at DESC, id DESC);
CREATE INDEX consent_purpose ON privacy.consent (purpose, customer_id);

CREATE VIEW privacy.consent_current AS
SELECT DISTINCT ON (customer_id, purpose)
       customer_id, purpose, granted, source, recorded_at, recorded_by
FROM privacy.consent
ORDER BY customer_id, purpose, recorded_at DESC, id DESC;

ALTER TABLE privacy.consent OWNER TO PrivacyAdmin;
ALTER VIEW privacy.consent_current OWNER TO PrivacyAdmin;
REVOKE ALL ON privacy.consent, privacy.consent_current FROM PUBLIC;
