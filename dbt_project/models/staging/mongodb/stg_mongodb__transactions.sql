-- The scored copy of each payment: the fraud label (isFraud) and the model's AnomalyScore. The
-- customer's email and IP address are personal data the marts do not need: left out.
with scored as (
    {{ latest_cdc_rows(source('mongodb', 'transaction'), [raw_col('_id')], '_ab_cdc_cursor') }}
)

select
    {{ raw_col('_id') }} as transaction_document_id,
    {{ raw_col('transaction_id') }} as transaction_id,
    cast({{ raw_col('AnomalyScore') }} as {{ dbt.type_float() }}) as anomaly_score,
    coalesce(cast({{ raw_col('isFraud') }} as integer), 0) = 1 as is_fraud,
    {{ raw_col('transaction_country') }} as transaction_country,
    {{ raw_col('billing_country') }} as billing_country,
    {{ raw_col('timestamp') }} as transacted_at,
    _airbyte_extracted_at as extracted_at
from scored
