-- FACT_FraudAnalysis counts every payment the stream scored, and every one it flagged at its
-- latest change, once, whatever the number of changes (LSNs) scored.
with payments as (
    select transaction_id from {{ ref('stg_postgres__transactions') }}
),

latest as (
    select transaction_id, is_fraud from (
        select
            transaction_id,
            is_fraud,
            row_number() over (partition by transaction_id order by lsn desc) as newest
        from {{ ref('stg_postgres__fraud_score_events') }}
    ) as ranked
    where newest = 1 and transaction_id in (select transaction_id from payments)
),

expected as (
    select
        (select count(*) from latest) as scored,
        (select count(*) from latest where is_fraud) as flagged
),

actual as (
    select
        coalesce(sum(StreamScoredCount), 0) as scored,
        coalesce(sum(StreamFlaggedCount), 0) as flagged
    from {{ ref('FACT_FraudAnalysis') }}
)

select expected.*, actual.scored as fact_scored, actual.flagged as fact_flagged
from expected cross join actual
where expected.scored != actual.scored or expected.flagged != actual.flagged
