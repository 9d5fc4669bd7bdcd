-- numeric takes 'NaN', and NaN sorts above every number, so CHECK (Amount >= 0) lets it through:
-- an amount that is not a number would reach every reader (totals, fees, fraud scores) as NaN.
-- Refused here. A CHECK added to the partitioned table holds on every partition: the monthly ones,
-- the default one, and those `stripe-platform db partitions` creates later.
DO $$
DECLARE
    bad bigint;
BEGIN
    SELECT count(*) INTO bad FROM Transaction WHERE Amount = 'NaN';
    IF bad > 0 THEN
        RAISE EXCEPTION '% transaction(s) have Amount NaN: correct them, then migrate again', bad
            USING ERRCODE = 'check_violation',
                  HINT = 'SELECT ID, DateTime FROM Transaction WHERE Amount = ''NaN''';
    END IF;
END $$;

ALTER TABLE Transaction ADD CONSTRAINT transaction_amount_not_nan CHECK (Amount <> 'NaN');
COMMENT ON CONSTRAINT transaction_amount_not_nan ON Transaction IS
    'Amount must be a number: numeric accepts NaN, which passes Amount >= 0.';
