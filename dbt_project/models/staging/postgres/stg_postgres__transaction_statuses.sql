select
    id as status_id,
    name as status_name,
    isterminal as is_terminal,
    description as status_description
from {{ source('postgres', 'transactionstatus') }}
