with changes as (
    {{ latest_cdc_rows(source('postgres', 'transactionstatechanges'), ['id'], '_ab_cdc_lsn') }}
)

select
    id as state_change_id,
    transactionid as transaction_id,
    transactiondatetime as transacted_at,
    fromstatusid as from_status_id,
    tostatusid as to_status_id,
    reason,
    updatedby as updated_by,
    updatedat as changed_at,
    _airbyte_extracted_at as extracted_at
from changes
