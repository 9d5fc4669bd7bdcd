-- The consent registry (issue 23, compliance/consent.py, docs/compliance.md): per data subject and
-- purpose, every consent given or withdrawn, with when and through what (the CLI, the API, a
-- browser's Global Privacy Control signal, a data-subject request, the seed). History is kept:
-- the latest record of a (customer, purpose) wins (RecordedAt, then ID).
--
-- Purposes: analytics, ml_training and marketing are opt-in (GDPR Art. 6(1)(a)/7: no record = no
-- consent); sale is the CCPA right to opt out of the sale or sharing of personal information
-- (1798.120): no record = not opted out, Granted = false = opted out (do not sell).
--
-- Why in public, beside the business tables, and not in the privacy schema of 0023: pipelines
-- honour it downstream too (the marts shared with third parties, dbt_project/models/marts/
-- MKT_*), and a table reaches the warehouse and the lake only through the one stream catalog
-- (airbyte/catalog.yaml), whose PostgreSQL source reads public. What it says is a customer id and
-- a yes/no per purpose (NONE, as Transaction.CustomerID); who typed it in (RecordedBy, a staff
-- login or service name) is QUASI: hidden below admin and never synced.

CREATE TABLE Consent (
    ID bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Customer.ID; no foreign key, as for the other append-only records: the erasure of a customer
    -- (compliance/stores.py) deletes their consent rows with the rest of what names them.
    CustomerID bigint NOT NULL CHECK (CustomerID > 0),
    Purpose text NOT NULL CHECK (Purpose IN ('analytics', 'ml_training', 'marketing', 'sale')),
    Granted boolean NOT NULL,
    Source text NOT NULL CHECK (Source IN ('cli', 'api', 'gpc', 'request', 'seed')),
    RecordedAt timestamptz NOT NULL,
    RecordedBy text NOT NULL CHECK (RecordedBy <> ''),
    CreatedAt timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UpdatedAt timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX consent_latest ON Consent (CustomerID, Purpose, RecordedAt DESC, ID DESC);
CREATE INDEX consent_purpose ON Consent (Purpose, CustomerID);
CREATE INDEX consent_updated ON Consent (UpdatedAt);
CREATE TRIGGER consent_touch BEFORE UPDATE ON Consent
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

COMMENT ON TABLE Consent IS
    'Consent per customer and purpose, with history: the latest record wins (compliance/consent.py).';
COMMENT ON COLUMN Consent.ID IS 'NONE: record id';
COMMENT ON COLUMN Consent.CustomerID IS 'NONE: the data subject [user.unique_id] [subject]';
COMMENT ON COLUMN Consent.Purpose IS 'NONE: analytics, ml_training, marketing or sale (do not sell) [user.privacy_preferences]';
COMMENT ON COLUMN Consent.Granted IS 'NONE: consent given (sale: false = opted out) [user.privacy_preferences]';
COMMENT ON COLUMN Consent.Source IS 'NONE: cli, api, gpc (Global Privacy Control), request or seed [system.operations]';
COMMENT ON COLUMN Consent.RecordedAt IS 'NONE: when the subject gave or withdrew it [user.privacy_preferences]';
COMMENT ON COLUMN Consent.RecordedBy IS 'QUASI: who recorded it (staff login or service) [system.operations]';
COMMENT ON COLUMN Consent.CreatedAt IS 'NONE: row created [system.operations]';
COMMENT ON COLUMN Consent.UpdatedAt IS 'NONE: row changed, the sync cursor [system.operations]';
