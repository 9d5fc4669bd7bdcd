select
    fromstatusid as from_status_id,
    tostatusid as to_status_id
from {{ source('postgres', 'transactionstatustransition') }}
