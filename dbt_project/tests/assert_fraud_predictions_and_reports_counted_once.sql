-- FACT_FraudAnalysis counts every scored payment, every payment the newest champion flags and
-- every payment with a fraud report once, whatever the number of versions or reports.
with payments as (
    select transaction_id from {{ ref('stg_postgres__transactions') }}
),

newest as (
    select transaction_id, is_fraud from (
        select
            transaction_id,
            is_fraud,
            row_number() over (
                partition by transaction_id order by scored_at desc, model_version desc
            ) as newest
        from {{ ref('stg_postgres__fraud_scores') }}
    ) as ranked
    where newest = 1
),

reported as (
    select distinct c.transaction_id
    from {{ ref('stg_postgres__transaction_state_changes') }} as c
    inner join {{ ref('stg_postgres__transaction_statuses') }} as s on c.to_status_id = s.status_id
    inner join {{ ref('fraud_dispute_reasons') }} as r on c.reason = r.reason
    where s.status_name = 'disputed'
),

expected as (
    select
        (select count(*) from newest where transaction_id in (select transaction_id from payments))
            as scored,
        (select count(*) from newest
         where is_fraud and transaction_id in (select transaction_id from payments)) as predicted,
        (select count(*) from reported
         where transaction_id in (select transaction_id from payments)) as confirmed
),

actual as (
    select
        coalesce(sum(ScoredCount), 0) as scored,
        coalesce(sum(PredictedFraudCount), 0) as predicted,
        coalesce(sum(ConfirmedFraudCount), 0) as confirmed
    from {{ ref('FACT_FraudAnalysis') }}
)

select expected.*, actual.scored as fact_scored, actual.predicted as fact_predicted,
       actual.confirmed as fact_confirmed
from expected cross join actual
where expected.scored != actual.scored
   or expected.predicted != actual.predicted
   or expected.confirmed != actual.confirmed
