-- FACT_FraudAnalysis counts every payment labelled fraudulent in the scored documents, once.
with expected as (
    select count(*) as frauds
    from {{ ref('stg_mongodb__transactions') }} as scored
    inner join {{ ref('stg_postgres__transactions') }} as t on scored.transaction_id = t.transaction_id
    where scored.is_fraud
),

actual as (
    select coalesce(sum(FraudCount), 0) as frauds from {{ ref('FACT_FraudAnalysis') }}
)

select expected.frauds, actual.frauds as fact_frauds
from expected cross join actual
where expected.frauds != actual.frauds
