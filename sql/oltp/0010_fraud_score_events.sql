-- The stream scorer's scores (`stripe-platform stream fraud`, src/stripe_platform/streaming/scorer.py):
-- one row per change event of a payment, keyed by (transaction, WAL position of the change), so a
-- change re-delivered after a crash (the source's position moves only once these rows, the
-- documents and the alerts are written) inserts nothing twice: ON CONFLICT DO NOTHING.
-- A public table like FraudScore, it reaches the warehouse through the ingestion catalog, where
-- FACT_FraudAnalysis reads it. Not a declared foreign key to Transaction (partitions must stay
-- detachable for retention, as for FraudScore).
CREATE TABLE FraudScoreEvent (
    TransactionID bigint NOT NULL,
    -- The change's WAL position as a number (pg_lsn - '0/0'; Debezium's source.lsn).
    LSN bigint NOT NULL CHECK (LSN >= 0),
    TransactionDateTime timestamptz NOT NULL,
    -- When the source transaction committed: commit-to-score starts here.
    CommitTime timestamptz NOT NULL,
    ScoredAt timestamptz NOT NULL DEFAULT clock_timestamp(),
    ModelName text NOT NULL,
    ModelVersion integer NOT NULL CHECK (ModelVersion > 0),
    FeatureVersion text NOT NULL,
    Score double precision NOT NULL CHECK (Score >= 0 AND Score <= 1),
    Threshold double precision NOT NULL CHECK (Threshold >= 0 AND Threshold <= 1),
    IsFraud boolean NOT NULL,
    Source text NOT NULL CHECK (Source IN ('embedded', 'debezium')),
    CommitToScoreMs double precision NOT NULL,
    -- The outbox of the Transaction document write, as in FraudScore: NULL while the document does
    -- not carry this score yet (or the payment's document is not there yet: retried for a while).
    DocumentWrittenAt timestamptz,
    -- When the fraud alert of this score went to the alert sink (NULL: none sent), so a replay
    -- does not alert twice.
    AlertedAt timestamptz,
    UpdatedAt timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (TransactionID, LSN)
);
COMMENT ON TABLE FraudScoreEvent IS
    'Fraud scores of the change stream (stripe-platform stream fraud), one per payment change (transaction id, LSN); IsFraud = Score >= Threshold.';
CREATE INDEX fraudscoreevent_pending ON FraudScoreEvent (ScoredAt)
    WHERE DocumentWrittenAt IS NULL;
CREATE INDEX fraudscoreevent_updated ON FraudScoreEvent (UpdatedAt);

CREATE TRIGGER fraudscoreevent_touch BEFORE UPDATE ON FraudScoreEvent
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
