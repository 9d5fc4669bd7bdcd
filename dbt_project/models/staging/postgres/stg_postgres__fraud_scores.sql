with scores as (
    {{ latest_cdc_rows(source('postgres', 'fraudscore'), ['transactionid', 'modelname', 'modelversion'], '_ab_cdc_lsn') }}
)

select
    transactionid as transaction_id,
    transactiondatetime as transacted_at,
    modelname as model_name,
    modelversion as model_version,
    featureversion as feature_version,
    cast(score as {{ dbt.type_float() }}) as score,
    cast(threshold as {{ dbt.type_float() }}) as threshold,
    isfraud as is_fraud,
    scoredat as scored_at,
    documentwrittenat as document_written_at,
    updatedat as updated_at,
    _airbyte_extracted_at as extracted_at
from scores
