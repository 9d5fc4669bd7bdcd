with events as (
    {{ latest_cdc_rows(source('postgres', 'fraudscoreevent'), ['transactionid', 'lsn'], '_ab_cdc_lsn') }}
)

select
    transactionid as transaction_id,
    lsn,
    transactiondatetime as transacted_at,
    committime as committed_at,
    scoredat as scored_at,
    modelname as model_name,
    modelversion as model_version,
    featureversion as feature_version,
    cast(score as {{ dbt.type_float() }}) as score,
    cast(threshold as {{ dbt.type_float() }}) as threshold,
    isfraud as is_fraud,
    source as change_source,
    cast(committoscorems as {{ dbt.type_float() }}) as commit_to_score_ms,
    documentwrittenat as document_written_at,
    alertedat as alerted_at,
    updatedat as updated_at,
    _airbyte_extracted_at as extracted_at
from events
