select
    id as merchant_size_id,
    name as merchant_size_name,
    description as merchant_size_description
from {{ source('postgres', 'merchantsize') }}
