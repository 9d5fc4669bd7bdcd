select
    id as industry_id,
    name as industry_name
from {{ source('postgres', 'industry') }}
