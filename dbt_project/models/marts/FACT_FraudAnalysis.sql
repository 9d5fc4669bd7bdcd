-- Fraud per day, customer, merchant, location and payment method. FraudCount counts the payments
-- labelled fraudulent in their Transaction documents (isFraud: the seed's label, the model's
-- decision once batch-scored; the brief's query reads it); ChargebackCount the payments whose
-- dispute was lost. Beside them, the fraud model's predictions (ScoredCount, PredictedFraudCount,
-- AvgFraudScore: the newest champion's score of each payment, FraudScore) and the confirmed fraud
-- (ConfirmedFraudCount: fraud reports), and the payments both predicted and confirmed. The stream
-- scorer's columns (StreamScoredCount, StreamFlaggedCount, AvgStreamScore, the commit-to-score
-- delays: FraudScoreEvent) show what real-time scoring saw and how fast. Incremental: each run
-- recomputes only the days that received changes.
-- depends_on: {{ source('postgres', 'transaction') }}
{{
    config(
        materialized='incremental',
        unique_key='DateKey',
        incremental_strategy='delete+insert',
        on_schema_change='fail',
        pre_hook="{% if is_incremental() %}delete from {{ this }} where DateKey in ({{ changed_date_keys() }}){% endif %}",
        tags=['fraud']
    )
}}

with transactions as (
    select * from {{ ref('int_transactions') }}
    {% if is_incremental() %}
    where date_key in ({{ changed_date_keys() }})
    {% endif %}
),

-- The day's p95 commit-to-score delay: a percentile does not add up across groups, so it is the
-- day's (over all its stream-scored payments), the same on each row of that day. Days are
-- recomputed whole, so it stays current.
stream_days as (
    select
        date_key as day_key,
        percentile_cont(0.95) within group (order by stream_commit_to_score_ms)
            as p95_commit_to_score_ms
    from transactions
    where is_stream_scored
    group by date_key
)

select
    cast({{ dbt.hash(dbt.concat(["cast(date_key as " ~ dbt.type_string() ~ ")", "'|'", "cast(customer_id as " ~ dbt.type_string() ~ ")", "'|'", "cast(merchant_id as " ~ dbt.type_string() ~ ")", "'|'", "cast(location_id as " ~ dbt.type_string() ~ ")", "'|'", "cast(payment_method_id as " ~ dbt.type_string() ~ ")"])) }} as varchar) as ID,
    date_key as DateKey,
    customer_id as CustomerKey,
    merchant_id as MerchantKey,
    location_id as LocationKey,
    payment_method_id as PaymentMethodKey,
    cast(sum(case when is_fraud then 1 else 0 end) as integer) as FraudCount,
    cast(sum(case when is_charged_back then 1 else 0 end) as integer) as ChargebackCount,
    cast(count(*) as integer) as TransactionCount,
    cast(sum(case when is_fraud then amount_eur else 0 end) as numeric(18, 2)) as FraudAmount,
    cast(sum(case when is_scored then 1 else 0 end) as integer) as ScoredCount,
    cast(sum(case when is_predicted_fraud then 1 else 0 end) as integer) as PredictedFraudCount,
    -- avg ignores the unscored payments: NULL for a group none of whose payments is scored.
    cast(avg(fraud_score) as numeric(7, 6)) as AvgFraudScore,
    cast(sum(case when is_confirmed_fraud then 1 else 0 end) as integer) as ConfirmedFraudCount,
    cast(sum(case when is_predicted_fraud and is_confirmed_fraud then 1 else 0 end) as integer)
        as PredictedConfirmedFraudCount,
    cast(sum(case when is_stream_scored then 1 else 0 end) as integer) as StreamScoredCount,
    cast(sum(case when is_stream_flagged then 1 else 0 end) as integer) as StreamFlaggedCount,
    cast(avg(stream_score) as numeric(7, 6)) as AvgStreamScore,
    cast(avg(stream_commit_to_score_ms) as numeric(18, 3)) as AvgCommitToScoreMs,
    cast(max(days.p95_commit_to_score_ms) as numeric(18, 3)) as DayP95CommitToScoreMs,
    max(extracted_at) as LastExtractedAt
from transactions
left join stream_days as days on transactions.date_key = days.day_key
group by date_key, customer_id, merchant_id, location_id, payment_method_id
