-- The fraud model's batch scores (`stripe-platform ml score`, src/stripe_platform/ml/score.py): one
-- row per payment and model version, written once, so a re-run scores nothing twice. A public table
-- like the others, it reaches the warehouse through the ingestion catalog (airbyte/catalog.yaml),
-- where FACT_FraudAnalysis can set the model's predicted fraud beside the confirmed fraud reports.
-- Not a declared foreign key to Transaction: partitions must stay detachable for retention (as for
-- TransactionStateChanges); the scorer only scores payments it read from Transaction.
CREATE TABLE FraudScore (
    TransactionID bigint NOT NULL,
    TransactionDateTime timestamptz NOT NULL,
    ModelName text NOT NULL,
    ModelVersion integer NOT NULL CHECK (ModelVersion > 0),
    FeatureVersion text NOT NULL,
    Score double precision NOT NULL CHECK (Score >= 0 AND Score <= 1),
    Threshold double precision NOT NULL CHECK (Threshold >= 0 AND Threshold <= 1),
    IsFraud boolean NOT NULL,
    ScoredAt timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    -- Set once the Transaction document carries this score (NULL: still to write, or the write was
    -- interrupted; the next run writes it). The rows are the outbox of the document writes.
    DocumentWrittenAt timestamptz,
    UpdatedAt timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (TransactionID, ModelName, ModelVersion)
);
COMMENT ON TABLE FraudScore IS
    'Fraud model scores per payment and model version (stripe-platform ml score); IsFraud = Score >= Threshold.';
CREATE INDEX fraudscore_pending ON FraudScore (ModelName, ModelVersion)
    WHERE DocumentWrittenAt IS NULL;
CREATE INDEX fraudscore_updated ON FraudScore (UpdatedAt);

CREATE TRIGGER fraudscore_touch BEFORE UPDATE ON FraudScore
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
